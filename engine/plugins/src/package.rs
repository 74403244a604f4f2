//! Plugin packages: a component and its manifest in one file, signed by its vendor with
//! minisign, and the operator's trust in vendors' keys.
//!
//! A package is an uncompressed tar holding exactly `plugin.toml` and `plugin.wasm`
//! (`mint plugin pack` writes one). Its signature is minisign's detached `.minisig` of
//! the package file (`minisign -Sm NAME.mintpkg`). The operator lists each vendor's
//! public keys; a package is trusted when one of them verifies its signature, and its
//! manifest's `vendor`, when given, names that vendor.

use base64::Engine as _;
use std::collections::BTreeMap;
use std::io::Read;

/// The most bytes a package may hold (a component with an embedded interpreter, such as
/// one built by componentize-py, is tens of MiB).
pub const MAX_PACKAGE_BYTES: u64 = 256 << 20;

/// Why a package was refused. Nothing is installed when any of these happens.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    /// The bytes are not a package.
    #[error("not a mint plugin package: {0}")]
    Malformed(String),
    /// No signature, and the operator did not allow unsigned packages.
    #[error(
        "the package is not signed; have its vendor sign it (`minisign -Sm FILE`) and install it with its .minisig, or set `allow-unsigned = true` under [plugins] in the daemon's configuration"
    )]
    Unsigned,
    /// The signature text does not decode.
    #[error("the signature is not a minisign signature: {0}")]
    BadSignature(String),
    /// No trusted key has the signature's key ID.
    #[error(
        "the package is signed with key {key_id}, which is not among the trusted keys (trusted: {trusted}); add the vendor's public key under [plugins.trusted-keys] in the daemon's configuration"
    )]
    UntrustedKey {
        /// The signature's key ID.
        key_id: String,
        /// The trusted keys, as `vendor:KEYID`.
        trusted: String,
    },
    /// A trusted key's signature does not verify over these bytes.
    #[error(
        "the signature by {vendor}'s key {key_id} does not match the package's bytes: the package was changed after it was signed, or the signature belongs to another file"
    )]
    Mismatch {
        /// The vendor whose key made the signature.
        vendor: String,
        /// The key's ID.
        key_id: String,
    },
    /// The manifest names another vendor than the key's.
    #[error(
        "the manifest says `vendor = \"{claimed}\"` but the package is signed with a key of vendor `{signer}`"
    )]
    WrongVendor {
        /// What the manifest says.
        claimed: String,
        /// Whose key signed it.
        signer: String,
    },
}

/// Who vouches for a package.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case", rename_all_fields = "kebab-case")]
pub enum Signer {
    /// A trusted vendor's key verified the signature.
    Vendor {
        /// The vendor, as the operator named it.
        vendor: String,
        /// The key's ID, as minisign prints it.
        key_id: String,
        /// The signature's trusted comment (minisign puts the time and file name there).
        comment: String,
    },
    /// Installed unsigned, which the operator allowed.
    Unsigned,
    /// Built into the engine.
    Bundled,
}

impl std::fmt::Display for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Signer::Vendor { vendor, key_id, .. } => write!(f, "{vendor} (key {key_id})"),
            Signer::Unsigned => f.write_str("unsigned (allowed by the operator)"),
            Signer::Bundled => f.write_str("bundled with mint"),
        }
    }
}

/// A trusted public key.
#[derive(Clone)]
struct TrustedKey {
    vendor: String,
    key_id: String,
    key: minisign_verify::PublicKey,
}

/// The operator's trust: vendors' public keys, and whether unsigned packages may load.
#[derive(Clone, Default)]
pub struct Trust {
    keys: Vec<TrustedKey>,
    /// Whether a package without a signature may be installed.
    pub allow_unsigned: bool,
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trust")
            .field("keys", &self.describe())
            .field("allow_unsigned", &self.allow_unsigned)
            .finish()
    }
}

/// The key ID in a minisign key or signature blob (bytes 2..10, little-endian), as
/// minisign prints it: upper-case hex without leading zeros.
fn key_id(blob: &[u8]) -> Option<String> {
    let id: [u8; 8] = blob.get(2..10)?.try_into().ok()?;
    Some(format!("{:X}", u64::from_le_bytes(id)))
}

impl Trust {
    /// Trust from vendor → public keys (the base64 line of a `minisign.pub`, or the whole
    /// file's text). Errors name the vendor and the key.
    pub fn new(
        vendors: &BTreeMap<String, Vec<String>>,
        allow_unsigned: bool,
    ) -> Result<Trust, String> {
        let mut keys = Vec::new();
        for (vendor, list) in vendors {
            if vendor.is_empty()
                || !vendor
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
            {
                return Err(format!(
                    "plugins.trusted-keys: vendor `{vendor}` must be letters, digits, `-`, `_` or `.`"
                ));
            }
            for text in list {
                let line = text
                    .lines()
                    .map(str::trim)
                    .rfind(|l| !l.is_empty() && !l.starts_with("untrusted comment:"))
                    .unwrap_or("");
                let bad = || {
                    format!(
                        "plugins.trusted-keys.{vendor}: `{line}` is not a minisign public key (the second line of the vendor's minisign.pub)"
                    )
                };
                let key = minisign_verify::PublicKey::from_base64(line).map_err(|_| bad())?;
                let blob = base64::engine::general_purpose::STANDARD
                    .decode(line)
                    .map_err(|_| bad())?;
                keys.push(TrustedKey {
                    vendor: vendor.clone(),
                    key_id: key_id(&blob).ok_or_else(bad)?,
                    key,
                });
            }
        }
        Ok(Trust {
            keys,
            allow_unsigned,
        })
    }

    /// The trusted keys as `vendor:KEYID`.
    pub fn describe(&self) -> Vec<String> {
        self.keys
            .iter()
            .map(|k| format!("{}:{}", k.vendor, k.key_id))
            .collect()
    }

    /// Who signed `package`, checked against the trusted keys.
    pub fn verify(&self, package: &[u8], signature: Option<&str>) -> Result<Signer, PackageError> {
        let Some(text) = signature.map(str::trim).filter(|s| !s.is_empty()) else {
            return if self.allow_unsigned {
                Ok(Signer::Unsigned)
            } else {
                Err(PackageError::Unsigned)
            };
        };
        let sig = minisign_verify::Signature::decode(text)
            .map_err(|e| PackageError::BadSignature(e.to_string()))?;
        let blob = text
            .lines()
            .nth(1)
            .and_then(|l| {
                base64::engine::general_purpose::STANDARD
                    .decode(l.trim())
                    .ok()
            })
            .and_then(|b| key_id(&b))
            .ok_or_else(|| {
                PackageError::BadSignature("its second line is not a signature".into())
            })?;
        let Some(k) = self.keys.iter().find(|k| k.key_id == blob) else {
            let trusted = self.describe();
            return Err(PackageError::UntrustedKey {
                key_id: blob,
                trusted: if trusted.is_empty() {
                    "none".into()
                } else {
                    trusted.join(", ")
                },
            });
        };
        k.key
            .verify(package, &sig, false)
            .map_err(|_| PackageError::Mismatch {
                vendor: k.vendor.clone(),
                key_id: k.key_id.clone(),
            })?;
        Ok(Signer::Vendor {
            vendor: k.vendor.clone(),
            key_id: k.key_id.clone(),
            comment: sig.trusted_comment().to_string(),
        })
    }
}

/// A package's two files.
#[derive(Debug, Clone)]
pub struct Package {
    /// `plugin.toml`'s text.
    pub manifest: String,
    /// `plugin.wasm`'s bytes.
    pub wasm: Vec<u8>,
}

impl Package {
    /// Reads a package: a tar with exactly `plugin.toml` and `plugin.wasm`, both regular
    /// files.
    pub fn read(bytes: &[u8]) -> Result<Package, PackageError> {
        let bad = |m: String| PackageError::Malformed(m);
        if bytes.len() as u64 > MAX_PACKAGE_BYTES {
            return Err(bad(format!(
                "{} bytes exceeds the limit of {MAX_PACKAGE_BYTES}",
                bytes.len()
            )));
        }
        if bytes.starts_with(b"\0asm") {
            return Err(bad("this is a bare WebAssembly component; a package holds it with its manifest (`mint plugin pack --manifest plugin.toml --wasm FILE -o PACKAGE`)".into()));
        }
        let mut archive = tar::Archive::new(bytes);
        let (mut manifest, mut wasm) = (None, None);
        for entry in archive
            .entries()
            .map_err(|e| bad(format!("not a tar archive: {e}")))?
        {
            let mut entry = entry.map_err(|e| bad(format!("a damaged tar entry: {e}")))?;
            let path = entry
                .path()
                .map_err(|e| bad(e.to_string()))?
                .to_string_lossy()
                .trim_start_matches("./")
                .to_string();
            if !entry.header().entry_type().is_file() {
                return Err(bad(format!(
                    "`{path}` is not a regular file; a package holds only plugin.toml and plugin.wasm"
                )));
            }
            let mut data = Vec::new();
            entry
                .read_to_end(&mut data)
                .map_err(|e| bad(format!("`{path}`: {e}")))?;
            let slot = match path.as_str() {
                "plugin.toml" => &mut manifest,
                "plugin.wasm" => &mut wasm,
                other => {
                    return Err(bad(format!(
                        "unexpected file `{other}`; a package holds only plugin.toml and plugin.wasm"
                    )));
                }
            };
            if slot.replace(data).is_some() {
                return Err(bad(format!("`{path}` appears twice")));
            }
        }
        let manifest = manifest.ok_or_else(|| bad("it has no plugin.toml".into()))?;
        let manifest =
            String::from_utf8(manifest).map_err(|_| bad("plugin.toml is not UTF-8 text".into()))?;
        let wasm = wasm.ok_or_else(|| bad("it has no plugin.wasm".into()))?;
        Ok(Package { manifest, wasm })
    }

    /// Writes a package: a tar of the two files, with fixed metadata, so the same inputs
    /// make the same bytes (and the same signature verifies a rebuilt package).
    pub fn write(&self) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, data) in [
            ("plugin.toml", self.manifest.as_bytes()),
            ("plugin.wasm", self.wasm.as_slice()),
        ] {
            let mut header = tar::Header::new_ustar();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_mtime(0);
            header.set_entry_type(tar::EntryType::Regular);
            // Writing into a Vec cannot fail.
            let _ = builder.append_data(&mut header, name, data);
        }
        builder.into_inner().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packages_round_trip_and_refuse_strays() {
        let p = Package {
            manifest: "name = \"x\"".into(),
            wasm: b"\0asm".to_vec(),
        };
        let bytes = p.write();
        assert_eq!(bytes, p.write(), "the same inputs make the same bytes");
        let back = Package::read(&bytes).unwrap();
        assert_eq!(
            (back.manifest.as_str(), back.wasm.as_slice()),
            ("name = \"x\"", &b"\0asm"[..])
        );
        let mut extra = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_size(1);
        extra.append_data(&mut h, "evil.sh", &b"x"[..]).unwrap();
        let e = Package::read(&extra.into_inner().unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("evil.sh"), "{e}");
        assert!(
            Package::read(b"garbage")
                .unwrap_err()
                .to_string()
                .contains("not a mint plugin package")
        );
        assert!(
            Package::read(b"\0asm\x0d\0\x01\0")
                .unwrap_err()
                .to_string()
                .contains("mint plugin pack")
        );
    }

    #[test]
    fn key_ids_read_as_minisign_prints_them() {
        // minisign prints its key IDs with "%" PRIX64: no leading zeros.
        let blob = [0x45, 0x64, 0x35, 0xd9, 0x39, 0xc3, 0x87, 0x84, 0xea, 0x04];
        assert_eq!(key_id(&blob).unwrap(), "4EA8487C339D935");
        assert_eq!(key_id(&blob[..9]), None);
    }

    #[test]
    fn unsigned_needs_the_operators_permission() {
        let strict = Trust::new(&BTreeMap::new(), false).unwrap();
        assert!(matches!(
            strict.verify(b"x", None),
            Err(PackageError::Unsigned)
        ));
        let lax = Trust::new(&BTreeMap::new(), true).unwrap();
        assert_eq!(lax.verify(b"x", None).unwrap(), Signer::Unsigned);
        assert!(matches!(
            strict.verify(b"x", Some("nonsense")),
            Err(PackageError::BadSignature(_))
        ));
        let bad_key = BTreeMap::from([("acme".to_string(), vec!["RWQnotakey".to_string()])]);
        assert!(
            Trust::new(&bad_key, false)
                .unwrap_err()
                .contains("plugins.trusted-keys.acme")
        );
    }
}
