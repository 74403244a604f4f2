//! A server's certificate: the operator's files, or one generated at first start and kept
//! in a directory. The certificate in use can be swapped while serving (on SIGHUP):
//! handshakes after the swap present the new one, connections already open keep theirs.

use crate::{Pin, TlsError, provider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

/// Where a server's certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerSource {
    /// A PEM certificate chain (end entity first) and its PEM private key.
    Files {
        /// The chain.
        cert: PathBuf,
        /// The key.
        key: PathBuf,
    },
    /// `cert.pem` and `key.pem` in this directory, generated (self-signed, ECDSA P-256)
    /// when absent, for these names besides `localhost`, `127.0.0.1` and `::1`.
    SelfSigned {
        /// The directory.
        dir: PathBuf,
        /// Further DNS names or IP addresses.
        names: Vec<String>,
    },
}

/// The certificate a server presents, swappable in place.
#[derive(Debug, Clone)]
pub struct ServerCert {
    source: ServerSource,
    current: Arc<Current>,
}

#[derive(Debug)]
struct Current(RwLock<(Arc<CertifiedKey>, Pin)>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|p| p.into_inner()).0.clone())
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::File {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn load(cert: &Path, key: &Path) -> Result<(Arc<CertifiedKey>, Pin), TlsError> {
    let chain_pem = read("certificate file", cert)?;
    let chain = CertificateDer::pem_slice_iter(&chain_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Content {
            what: "certificate file",
            path: cert.to_path_buf(),
            message: format!("not PEM certificates: {e}"),
        })?;
    let Some(first) = chain.first() else {
        return Err(TlsError::Content {
            what: "certificate file",
            path: cert.to_path_buf(),
            message: "holds no PEM certificate".into(),
        });
    };
    let pin = Pin::of_certificate(first).map_err(|e| TlsError::Content {
        what: "certificate file",
        path: cert.to_path_buf(),
        message: e.to_string(),
    })?;
    let key_pem = read("key file", key)?;
    // The key's parse error is not quoted: it could echo key material.
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| TlsError::Content {
        what: "key file",
        path: key.to_path_buf(),
        message: "holds no PEM private key (PKCS#8, PKCS#1 or SEC1)".into(),
    })?;
    let certified =
        CertifiedKey::from_der(chain, key_der, &provider()).map_err(|e| TlsError::Content {
            what: "key file",
            path: key.to_path_buf(),
            message: format!("does not go with {}: {e}", cert.display()),
        })?;
    Ok((Arc::new(certified), pin))
}

/// Writes `bytes` to a new file `path` with `mode`, atomically (a sibling then a rename),
/// so a crash leaves either no file or the whole one.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    let what = "certificate directory";
    let err = |source| TlsError::File {
        what,
        path: path.to_path_buf(),
        source,
    };
    let partial = path.with_extension("partial");
    let _ = std::fs::remove_file(&partial);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&partial)
        .map_err(err)?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(err)?;
    std::fs::rename(&partial, path).map_err(err)
}

fn generate(dir: &Path, names: &[String]) -> Result<(), TlsError> {
    let what = "certificate directory";
    std::fs::create_dir_all(dir).map_err(|source| TlsError::File {
        what,
        path: dir.to_path_buf(),
        source,
    })?;
    let mut all = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    for n in names {
        if !all.contains(n) {
            all.push(n.clone());
        }
    }
    let key = rcgen::KeyPair::generate().map_err(|e| TlsError::Crypto(e.to_string()))?;
    let mut params = rcgen::CertificateParams::new(all)
        .map_err(|e| TlsError::Crypto(format!("certificate names: {e}")))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "mint");
    let cert = params
        .self_signed(&key)
        .map_err(|e| TlsError::Crypto(e.to_string()))?;
    // The key first: a certificate without its key would be unusable, a key without its
    // certificate is regenerated next time.
    write_new(&dir.join("key.pem"), key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&dir.join("cert.pem"), cert.pem().as_bytes(), 0o644)
}

impl ServerCert {
    /// Loads the certificate, generating a self-signed one first if its directory has none.
    pub fn load(source: ServerSource) -> Result<ServerCert, TlsError> {
        let loaded = Self::read(&source)?;
        Ok(ServerCert {
            source,
            current: Arc::new(Current(RwLock::new(loaded))),
        })
    }

    fn read(source: &ServerSource) -> Result<(Arc<CertifiedKey>, Pin), TlsError> {
        match source {
            ServerSource::Files { cert, key } => load(cert, key),
            ServerSource::SelfSigned { dir, names } => {
                let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
                if !cert.is_file() || !key.is_file() {
                    generate(dir, names)?;
                }
                load(&cert, &key)
            }
        }
    }

    /// Reads the files again and serves what they hold from the next handshake on. On an
    /// error the certificate in use stays.
    pub fn reload(&self) -> Result<Pin, TlsError> {
        let loaded = Self::read(&self.source)?;
        let pin = loaded.1;
        *self.current.0.write().unwrap_or_else(|p| p.into_inner()) = loaded;
        Ok(pin)
    }

    /// The pin of the certificate in use.
    pub fn pin(&self) -> Pin {
        self.current.0.read().unwrap_or_else(|p| p.into_inner()).1
    }

    /// Where the certificate comes from.
    pub fn source(&self) -> &ServerSource {
        &self.source
    }

    /// An acceptor presenting whichever certificate is current at each handshake.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_no_client_auth()
            .with_cert_resolver(self.current.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn self_signed_is_generated_once_and_kept_private() {
        let dir = std::env::temp_dir().join(format!("mint-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let source = ServerSource::SelfSigned {
            dir: dir.clone(),
            names: vec!["198.18.0.1".into(), "mint.example".into()],
        };
        let a = ServerCert::load(source.clone()).unwrap();
        let b = ServerCert::load(source).unwrap();
        assert_eq!(
            a.pin(),
            b.pin(),
            "a second start must keep the first certificate"
        );
        let mode = std::fs::metadata(dir.join("key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "key.pem is {mode:o}");
        // The operator's own files: the generated pair, given explicitly, has the same pin;
        // a key that does not match the certificate is refused, naming both files.
        let files = ServerCert::load(ServerSource::Files {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        })
        .unwrap();
        assert_eq!(files.pin(), a.pin());
        let other = dir.join("other");
        generate(&other, &[]).unwrap();
        let e = ServerCert::load(ServerSource::Files {
            cert: dir.join("cert.pem"),
            key: other.join("key.pem"),
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("other/key.pem") && e.contains("cert.pem"), "{e}");
        // A reload that fails keeps the certificate in use.
        std::fs::write(dir.join("cert.pem"), "garbage").unwrap();
        assert!(a.reload().is_err());
        assert_eq!(a.pin(), b.pin());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
