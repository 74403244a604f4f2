//! Key pins: the SHA-256 of a certificate's SubjectPublicKeyInfo, written `sha256:<hex>`
//! (what kubeadm's `--discovery-token-ca-cert-hash` pins). A pin survives re-issuing a
//! certificate for the same key, and names the key no matter who signed it.

use crate::TlsError;
use sha2::{Digest, Sha256};
use std::fmt;

/// A SubjectPublicKeyInfo's SHA-256.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Pin([u8; 32]);

impl Pin {
    /// The pin of a DER SubjectPublicKeyInfo.
    pub fn of_spki(spki: &[u8]) -> Pin {
        Pin(Sha256::digest(spki).into())
    }

    /// The pin of a DER certificate's key.
    pub fn of_certificate(der: &[u8]) -> Result<Pin, TlsError> {
        let cert = rustls::pki_types::CertificateDer::from(der);
        let parsed = rustls::server::ParsedCertificate::try_from(&cert)
            .map_err(|e| TlsError::Crypto(format!("not a certificate: {e}")))?;
        Ok(Pin::of_spki(parsed.subject_public_key_info().as_ref()))
    }

    /// Whether two pins are equal, in time independent of where they differ.
    pub fn matches(&self, other: &Pin) -> bool {
        self.0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl std::str::FromStr for Pin {
    type Err = TlsError;

    fn from_str(s: &str) -> Result<Pin, TlsError> {
        let hex = s
            .trim()
            .strip_prefix("sha256:")
            .ok_or_else(|| TlsError::BadPin(s.to_string()))?;
        let bytes = hex::decode(hex).map_err(|_| TlsError::BadPin(s.to_string()))?;
        let bytes: [u8; 32] = bytes
            .try_into()
            .map_err(|_| TlsError::BadPin(s.to_string()))?;
        Ok(Pin(bytes))
    }
}

impl fmt::Display for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_parse_and_print_alike() {
        let p = Pin::of_spki(b"key");
        let text = p.to_string();
        assert!(text.starts_with("sha256:") && text.len() == 7 + 64);
        assert_eq!(text.parse::<Pin>().unwrap(), p);
        for bad in [
            "",
            "sha256:",
            "sha1:00",
            "sha256:zz",
            &text[..text.len() - 2],
            &format!("{text}00"),
        ] {
            let e = bad.parse::<Pin>().unwrap_err().to_string();
            assert!(
                e.contains("sha256:") && e.contains("SubjectPublicKeyInfo"),
                "{bad}: {e}"
            );
        }
        assert!(p.matches(&p) && !p.matches(&Pin::of_spki(b"other")));
    }
}
