//! The trust a client places in the servers it talks to: the machine's roots, a CA file,
//! one pinned key, or nothing at all. A verifier also remembers the key a server
//! presented, so a refusal can name the pin that would have admitted it (for the operator
//! to check against the server's own, never to be trusted on first use).

use crate::{Pin, TlsError, provider};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

/// How a client decides whether a server is the one it means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Certificates chaining to the machine's trust store, for the name dialled.
    System,
    /// Certificates chaining to the CA certificates (PEM) in this file, for the name dialled.
    Ca(PathBuf),
    /// Exactly the certificate key with this pin, whatever names it carries.
    Pin(Pin),
    /// Anything. Only for a lab; every use is logged by whoever chose it.
    Insecure,
}

impl Trust {
    /// What a client's `--ca FILE` / `--pin sha256:...` flags choose for a server at `url`:
    /// the CA file, else the pin, else the system's roots for an `https://` URL; none for
    /// plain HTTP, which needs no anchors.
    pub fn from_flags(
        ca: Option<&std::path::Path>,
        pin: Option<&str>,
        url: &str,
    ) -> Result<Option<Trust>, TlsError> {
        Ok(match (ca, pin) {
            (Some(ca), _) => Some(Trust::Ca(ca.to_path_buf())),
            (None, Some(pin)) => Some(Trust::Pin(pin.parse()?)),
            (None, None) if url.starts_with("https://") => Some(Trust::System),
            (None, None) => None,
        })
    }
}

impl std::fmt::Display for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Trust::System => f.write_str("system roots"),
            Trust::Ca(p) => write!(f, "CA file {}", p.display()),
            Trust::Pin(p) => write!(f, "pin {p}"),
            Trust::Insecure => f.write_str("insecure (no verification)"),
        }
    }
}

/// A [`Trust`] with its anchors loaded, ready to make client configurations.
#[derive(Debug, Clone)]
pub struct ClientTrust {
    trust: Trust,
    webpki: Option<Arc<WebPkiServerVerifier>>,
}

/// The key the server of one connection presented, once it has.
#[derive(Debug, Default)]
pub struct Presented(Mutex<Option<Pin>>);

impl Presented {
    /// The presented key's pin, if the handshake got that far.
    pub fn pin(&self) -> Option<Pin> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn system_roots() -> Result<Arc<RootCertStore>, TlsError> {
    static ROOTS: OnceLock<Result<Arc<RootCertStore>, String>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            let mut roots = RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found
                    .errors
                    .first()
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| "no certificates found".into());
                return Err(why);
            }
            Ok(Arc::new(roots))
        })
        .clone()
        .map_err(TlsError::SystemRoots)
}

fn ca_roots(path: &std::path::Path) -> Result<Arc<RootCertStore>, TlsError> {
    let what = "CA file";
    let bytes = std::fs::read(path).map_err(|source| TlsError::File {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&bytes) {
        let cert = cert.map_err(|e| TlsError::Content {
            what,
            path: path.to_path_buf(),
            message: format!("not PEM certificates: {e}"),
        })?;
        roots.add(cert).map_err(|e| TlsError::Content {
            what,
            path: path.to_path_buf(),
            message: format!("unusable certificate: {e}"),
        })?;
    }
    if roots.is_empty() {
        return Err(TlsError::Content {
            what,
            path: path.to_path_buf(),
            message: "holds no PEM certificate".into(),
        });
    }
    Ok(Arc::new(roots))
}

impl ClientTrust {
    /// Loads `trust`'s anchors (reading the CA file or the system store now).
    pub fn new(trust: &Trust) -> Result<ClientTrust, TlsError> {
        let roots = match trust {
            Trust::System => Some(system_roots()?),
            Trust::Ca(path) => Some(ca_roots(path)?),
            Trust::Pin(_) | Trust::Insecure => None,
        };
        let webpki = roots
            .map(|r| {
                WebPkiServerVerifier::builder_with_provider(r, provider())
                    .build()
                    .map_err(|e| TlsError::Crypto(e.to_string()))
            })
            .transpose()?;
        Ok(ClientTrust {
            trust: trust.clone(),
            webpki,
        })
    }

    /// The trust this was made from.
    pub fn trust(&self) -> &Trust {
        &self.trust
    }

    /// A client configuration for any number of connections.
    pub fn config(&self) -> Arc<ClientConfig> {
        self.watched().0
    }

    /// A client configuration for one connection, and where it records the key the
    /// server presented.
    pub fn watched(&self) -> (Arc<ClientConfig>, Arc<Presented>) {
        let presented = Arc::new(Presented::default());
        let verifier = Arc::new(Verifier {
            trust: self.trust.clone(),
            webpki: self.webpki.clone(),
            presented: presented.clone(),
        });
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        (Arc::new(config), presented)
    }
}

#[derive(Debug)]
struct Verifier {
    trust: Trust,
    webpki: Option<Arc<WebPkiServerVerifier>>,
    presented: Arc<Presented>,
}

/// A pinned key that was not the one presented.
#[derive(Debug, thiserror::Error)]
#[error("the server's key is {presented}, not the pinned {pinned}")]
struct PinMismatch {
    presented: Pin,
    pinned: Pin,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = Pin::of_certificate(end_entity).map_err(|_| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        })?;
        *self.presented.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(presented);
        match (&self.trust, &self.webpki) {
            (Trust::Insecure, _) => Ok(ServerCertVerified::assertion()),
            (Trust::Pin(pinned), _) if pinned.matches(&presented) => {
                Ok(ServerCertVerified::assertion())
            }
            // `General`, since rustls prints other certificate errors by their Debug form.
            (Trust::Pin(pinned), _) => Err(rustls::Error::General(
                PinMismatch {
                    presented,
                    pinned: *pinned,
                }
                .to_string(),
            )),
            (_, Some(webpki)) => {
                webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
            }
            (_, None) => Err(rustls::Error::General("no trust anchors loaded".into())),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Even a pinned or unverified server proves it holds the presented key.
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
