//! Certificates for `edge-server` and `edge-agent`.
//!
//! - [`pem`]: loading certificate chains and private keys from PEM files, with
//!   errors that name the file.
//! - [`generate`]: self-signed server identities and local node certificates
//!   (a throwaway CA plus a leaf) for use before ACME is configured.
//! - [`store`]: atomic writes (temp file + rename) with private key files
//!   created mode 0600, so a crash never leaves a half-written key.
//!
//! - [`acme`]: ACME issuance with DNS-01 or TLS-ALPN-01 (instant-acme), several directories
//!   tried in order, accounts persisted; used by server and agent.
//! - [`info`]: names, issuer and validity of a certificate or CSR.
//! - [`renewal`]: when to renew and how to back off (pure functions).
//! - [`tls_alpn`]: the certificate answering a TLS-ALPN-01 challenge.
#![forbid(unsafe_code)]

pub mod acme;
pub mod generate;
pub mod info;
pub mod pem;
pub mod renewal;
pub mod store;
pub mod tls_alpn;

/// Unix seconds as RFC 3339 (UTC), for logs and status output.
pub fn format_unix(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| secs.to_string())
}

use sha2::{Digest, Sha256};

/// SHA-256 over a certificate's DER bytes, as pinned by agents.
pub fn fingerprint(der: &[u8]) -> [u8; 32] {
    Sha256::digest(der).into()
}

/// Errors from this crate.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// A PEM file holds no usable item of the expected kind.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: std::path::PathBuf,
        /// What was wrong with its contents.
        what: String,
    },
    /// Certificate generation failed.
    #[error("generating certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// A generated key or certificate was refused by rustls.
    #[error("{0}")]
    Invalid(String),
}
