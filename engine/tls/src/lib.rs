//! TLS for mint: key pins, the trust a client places in a server (system roots, a CA
//! file, a pin, or none), server certificates (given, or self-signed at first start) that
//! reload in place, and a listener that serves HTTP over either plain TCP or TLS.
//!
//! Every piece uses ring as its one crypto provider, passed explicitly, so nothing depends
//! on a process-wide default that another crate may or may not have installed.

mod listener;
mod pin;
mod server;
mod trust;

pub use listener::{Incoming, Stream};
pub use pin::Pin;
pub use server::{ServerCert, ServerSource};
pub use trust::{ClientTrust, Presented, Trust};

/// What can go wrong loading certificates, keys and trust anchors.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{what} {path}: {source}")]
    File {
        /// What the file is for.
        what: &'static str,
        /// Its path.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file held nothing usable.
    #[error("{what} {path}: {message}")]
    Content {
        /// What the file is for.
        what: &'static str,
        /// Its path.
        path: std::path::PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A pin is not `sha256:` and 64 hex digits.
    #[error(
        "`{0}` is not a key pin: give `sha256:` followed by the 64 hex digits of the SHA-256 of the certificate's SubjectPublicKeyInfo"
    )]
    BadPin(String),
    /// The machine's trust store could not be read.
    #[error(
        "cannot read the system's trust store: {0} (install ca-certificates, or give a CA file or a pin)"
    )]
    SystemRoots(String),
    /// rustls or rcgen refused something.
    #[error("{0}")]
    Crypto(String),
}

/// The crypto provider every configuration here uses.
pub(crate) fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<std::sync::Arc<rustls::crypto::CryptoProvider>> =
        std::sync::OnceLock::new();
    PROVIDER
        .get_or_init(|| std::sync::Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}
