//! Certificates for `edge-server` and `edge-agent`.
//!
//! - [`pem`]: loading certificate chains and private keys from PEM files, with
//!   errors that name the file.
//! - [`generate`]: self-signed server identities and local node certificates
//!   (a throwaway CA plus a leaf) for use before ACME is configured.
//! - [`store`]: atomic writes (temp file + rename) with private key files
//!   created mode 0600, so a crash never leaves a half-written key.
//!
//! ACME issuance will live here too, shared by server and agent.
#![forbid(unsafe_code)]

pub mod generate;
pub mod pem;
pub mod store;

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
}
