//! Runtime glue shared by `edge-server` and `edge-agent`.
//!
//! The protocol logic lives in `edge-proto` (sans-IO); this crate holds the
//! few pieces both binaries need to move bytes with tokio and quinn:
//!
//! - [`quic`]: transport tuning for a busy tunnel and UDP sockets with large
//!   buffers.
//! - [`splice`]: TCP ⇄ QUIC stream copy with half-close and reset propagation.
//! - [`pinned`]: a rustls verifier that accepts exactly one certificate,
//!   identified by its SHA-256 fingerprint.
//! - [`https`]: one JSON request over HTTPS with a bearer token.
//! - [`logging`]: tracing subscriber setup (text or JSON).
#![forbid(unsafe_code)]

pub mod https;
pub mod logging;
pub mod pinned;
pub mod quic;
pub mod splice;

/// Raises the soft limit on open files to the hard limit: every client
/// connection costs a descriptor or two, and the common soft default of
/// 1024 would cap a busy server far below what it can carry.
pub fn raise_fd_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "open file limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open file limit"),
    }
}
