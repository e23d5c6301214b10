//! QUIC client frames too large for a DATAGRAM frame of the tunnel now,
//! carried on unidirectional tunnel streams instead, one frame per stream
//! ([`edge_proto::quic_datagram::STREAM_KIND_DATAGRAM`]): the server's and
//! the agent's halves of that fallback.
//!
//! Sending never waits: each frame goes out from a task of its own, at most
//! [`STREAMS_IN_FLIGHT`] per tunnel (the peer's limit on open
//! unidirectional streams), each given [`STREAM_DEADLINE`]; with none
//! free the frame is dropped, as UDP would. Reading takes a whole stream
//! under the same deadline and [`MAX_STREAM_LEN`].

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use edge_proto::quic_datagram::{self, MAX_STREAM_LEN, STREAM_KIND_DATAGRAM};
use tokio::sync::Semaphore;

/// Frame streams one tunnel may have open each way (the limit each end
/// grants its peer, [`crate::quic::TunnelTuning::transport`]).
pub const STREAMS_IN_FLIGHT: u32 = 64;

/// How long one frame stream may take to open, send or read.
pub const STREAM_DEADLINE: Duration = Duration::from_secs(2);

/// One tunnel's sending half.
#[derive(Debug, Clone)]
pub struct FrameStreams {
    tunnel: quinn::Connection,
    permits: Arc<Semaphore>,
}

impl FrameStreams {
    /// Frame streams on `tunnel`.
    pub fn new(tunnel: quinn::Connection) -> Self {
        Self { tunnel, permits: Arc::new(Semaphore::new(STREAMS_IN_FLIGHT as usize)) }
    }

    /// Sends `frame` on a stream of its own; false (the frame dropped) when
    /// it is too long or as many streams are in flight as allowed.
    pub fn send(&self, frame: &[u8]) -> bool {
        if 1 + frame.len() > MAX_STREAM_LEN {
            return false;
        }
        let Ok(permit) = self.permits.clone().try_acquire_owned() else { return false };
        let mut stream = Vec::with_capacity(1 + frame.len());
        stream.push(STREAM_KIND_DATAGRAM);
        stream.extend_from_slice(frame);
        let tunnel = self.tunnel.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let sent = tokio::time::timeout(STREAM_DEADLINE, async {
                let mut send = tunnel.open_uni().await.ok()?;
                send.write_all(&stream).await.ok()?;
                send.finish().ok()
            })
            .await;
            if !matches!(sent, Ok(Some(()))) {
                tracing::trace!("a QUIC client frame stream was not sent");
            }
        });
        true
    }
}

/// Reads one frame stream whole; `None` when it is not a valid one in time
/// (it is then stopped).
pub async fn read(mut recv: quinn::RecvStream) -> Option<Bytes> {
    let read = tokio::time::timeout(STREAM_DEADLINE, recv.read_to_end(MAX_STREAM_LEN)).await;
    let Ok(Ok(stream)) = read else {
        let _ = recv.stop(quinn::VarInt::from_u32(0));
        return None;
    };
    frame_of(stream)
}

/// Stops every unidirectional stream the peer opens on `tunnel` (one that
/// did not negotiate frame streams), so none sits buffered; returns when
/// the tunnel closes.
pub async fn refuse_all(tunnel: &quinn::Connection) {
    while let Ok(mut recv) = tunnel.accept_uni().await {
        let _ = recv.stop(quinn::VarInt::from_u32(0));
    }
}

/// The frame of a whole stream's bytes, if valid.
fn frame_of(stream: Vec<u8>) -> Option<Bytes> {
    quic_datagram::stream_frame(&stream).ok()?;
    Some(Bytes::from(stream).slice(1..))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_valid_stream_gives_its_frame_and_others_nothing() {
        let mut frame = Vec::new();
        quic_datagram::encode("[2001:db8::1]:443".parse().unwrap(), &[7; 1500], &mut frame);
        let mut stream = vec![STREAM_KIND_DATAGRAM];
        stream.extend_from_slice(&frame);
        assert_eq!(frame_of(stream).as_deref(), Some(frame.as_slice()));
        assert_eq!(frame_of(vec![2, 4, 1, 2, 3, 4, 0, 1, 9]), None, "unknown kind");
        assert_eq!(frame_of(vec![STREAM_KIND_DATAGRAM, 4, 1]), None, "truncated");
    }
}
