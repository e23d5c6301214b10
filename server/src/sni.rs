//! The I/O side of SNI reading: reads from a client until the sans-IO parser
//! in [`edge_proto::client_hello`] decides, keeping every byte for replay.
//!
//! Reads are capped at `max_bytes`; the caller puts the whole read under one
//! deadline, so a client that trickles bytes cannot hold the slot longer
//! than that.

use edge_proto::client_hello::{self, Parse, Rejection};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Why no server name came out of the client's first bytes.
#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    /// The parser refused the bytes.
    #[error("{0}")]
    Rejected(Rejection),
    /// The client closed before completing its hello.
    #[error("client closed after {0} bytes, before a complete ClientHello")]
    Closed(usize),
    /// Reading failed.
    #[error("reading ClientHello: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads until a complete ClientHello is seen. Returns the server name and
/// every byte read, which the caller must replay unchanged.
pub async fn read_client_hello<S: AsyncRead + Unpin>(
    stream: &mut S,
    max_bytes: usize,
    buf: &mut Vec<u8>,
) -> Result<String, HelloError> {
    let mut chunk = [0u8; 4096];
    loop {
        let room = max_bytes.saturating_sub(buf.len()).min(chunk.len());
        if room == 0 {
            return Err(HelloError::Rejected(Rejection::TooLarge));
        }
        let n = stream.read(&mut chunk[..room]).await?;
        if n == 0 {
            return Err(HelloError::Closed(buf.len()));
        }
        buf.extend_from_slice(&chunk[..n]);
        match client_hello::parse(buf, max_bytes) {
            Parse::Incomplete => continue,
            Parse::Rejected(r) => return Err(HelloError::Rejected(r)),
            Parse::Found(name) => return Ok(name),
        }
    }
}
