//! Bidirectional copy between a TCP connection and a QUIC stream.
//!
//! A FIN on either side becomes a FIN on the other (half-close), so protocols
//! that close their write side first keep working. An abort on either side
//! becomes an abort on the other: a TCP reset resets the QUIC stream with
//! `abort_code`, and a QUIC reset makes the TCP side send an RST (linger 0),
//! so nobody waits on a peer that is gone. A TCP side that stops reading
//! while its tunnel needs the window gets both sides reset ([`crate::stall`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use quinn::{RecvStream, SendStream, VarInt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::stall::{is_shed, StallBudget, StallGuard};

/// Largest read per direction: four TLS records.
const BUF_LEN: usize = 64 * 1024;
/// Most QUIC chunks written to TCP in one vectored write.
const MAX_CHUNKS: usize = 64;

/// Byte counters a splice adds to as it goes.
#[derive(Debug, Default)]
pub struct ByteCounters {
    /// Bytes read from TCP and sent on the QUIC stream.
    pub tcp_to_quic: AtomicU64,
    /// Bytes received on the QUIC stream and written to TCP.
    pub quic_to_tcp: AtomicU64,
}

/// How a splice ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpliceEnd {
    /// Both directions finished with a FIN.
    Clean,
    /// The TCP side failed or reset; the QUIC stream was reset.
    TcpAborted,
    /// The QUIC side reset, stopped or lost its connection, or nothing moved
    /// for the idle timeout; TCP got an RST and the QUIC stream a reset.
    QuicAborted,
    /// The TCP side stopped reading and was shed to free the tunnel's
    /// window; both sides were reset.
    Shed,
}

enum Abort {
    Tcp,
    Quic,
    Idle,
    Shed,
}

/// Copies both ways until both sides have finished or one aborts.
/// `abort_code` is sent with the QUIC reset when the TCP side fails.
/// `stalls` is the budget of the QUIC connection `recv` belongs to.
pub async fn splice(
    mut tcp: TcpStream,
    mut send: SendStream,
    mut recv: RecvStream,
    abort_code: u32,
    counters: &ByteCounters,
    idle_timeout: Duration,
    stalls: &Arc<StallBudget>,
) -> SpliceEnd {
    let (mut tcp_read, tcp_write) = tcp.split();
    let mut tcp_write = StallGuard::new(tcp_write, stalls.clone());
    // Counts transfers in either direction; the watchdog below ends a
    // connection on which nothing moved for a whole `idle_timeout`.
    let moved = AtomicU64::new(0);
    // TCP → QUIC without a copy: the read buffer is handed to quinn as is.
    let upstream = async {
        let mut buf = BytesMut::new();
        loop {
            buf.reserve(BUF_LEN);
            let n = tcp_read.read_buf(&mut buf).await.map_err(|_| Abort::Tcp)?;
            if n == 0 {
                let _ = send.finish();
                return Ok(());
            }
            send.write_chunk(buf.split().freeze()).await.map_err(|_| Abort::Quic)?;
            counters.tcp_to_quic.fetch_add(n as u64, Ordering::Relaxed);
            moved.fetch_add(1, Ordering::Relaxed);
        }
    };
    // QUIC → TCP without a copy either: quinn yields one chunk per frame,
    // so up to 64 chunks go out in one vectored write (a write per frame
    // would cost more in syscalls than the copy saves).
    let downstream = async {
        let mut chunks: Vec<Bytes> = vec![Bytes::new(); MAX_CHUNKS];
        loop {
            match recv.read_chunks(&mut chunks).await {
                Ok(Some(n)) => {
                    let bytes = write_all_vectored(&mut tcp_write, &mut chunks[..n]).await.map_err(|e| {
                        if is_shed(&e) {
                            Abort::Shed
                        } else {
                            Abort::Tcp
                        }
                    })?;
                    counters.quic_to_tcp.fetch_add(bytes as u64, Ordering::Relaxed);
                    moved.fetch_add(1, Ordering::Relaxed);
                }
                Ok(None) => {
                    let _ = tcp_write.shutdown().await;
                    return Ok(());
                }
                Err(_) => return Err(Abort::Quic),
            }
        }
    };
    let watchdog = idle_watchdog(&moved, idle_timeout);
    let outcome = tokio::select! {
        both = async { tokio::try_join!(upstream, downstream) } => both.map(|_| ()),
        idle = watchdog => Err(idle),
    };
    match outcome {
        // A finished SendStream keeps delivering its buffer after the drop.
        Ok(_) => SpliceEnd::Clean,
        Err(Abort::Tcp) => {
            let _ = send.reset(VarInt::from_u32(abort_code));
            let _ = recv.stop(VarInt::from_u32(abort_code));
            SpliceEnd::TcpAborted
        }
        Err(abort @ (Abort::Quic | Abort::Idle | Abort::Shed)) => {
            let _ = send.reset(VarInt::from_u32(abort_code));
            let _ = recv.stop(VarInt::from_u32(abort_code));
            reset_tcp(&tcp);
            if matches!(abort, Abort::Shed) {
                SpliceEnd::Shed
            } else {
                SpliceEnd::QuicAborted
            }
        }
    }
}

/// Copies both ways between two TCP connections (`client` → `node` counts
/// as `tcp_to_quic`), with half-close, until both finish, one fails (both
/// get an RST), or nothing moved for a whole `idle_timeout`.
pub async fn splice_tcp(
    mut client: TcpStream,
    mut node: TcpStream,
    counters: &ByteCounters,
    idle_timeout: Duration,
) -> SpliceEnd {
    let (mut client_read, mut client_write) = client.split();
    let (mut node_read, mut node_write) = node.split();
    let moved = AtomicU64::new(0);
    async fn pump<R, W>(r: &mut R, w: &mut W, count: &AtomicU64, moved: &AtomicU64) -> Result<(), Abort>
    where
        R: tokio::io::AsyncRead + Unpin,
        W: tokio::io::AsyncWrite + Unpin,
    {
        let mut buf = vec![0u8; BUF_LEN];
        loop {
            let n = r.read(&mut buf).await.map_err(|_| Abort::Tcp)?;
            if n == 0 {
                let _ = w.shutdown().await;
                return Ok(());
            }
            w.write_all(&buf[..n]).await.map_err(|_| Abort::Tcp)?;
            count.fetch_add(n as u64, Ordering::Relaxed);
            moved.fetch_add(1, Ordering::Relaxed);
        }
    }
    let watchdog = idle_watchdog(&moved, idle_timeout);
    let outcome = tokio::select! {
        both = async {
            tokio::try_join!(
                pump(&mut client_read, &mut node_write, &counters.tcp_to_quic, &moved),
                pump(&mut node_read, &mut client_write, &counters.quic_to_tcp, &moved),
            )
        } => both.map(|_| ()),
        idle = watchdog => Err(idle),
    };
    match outcome {
        Ok(()) => SpliceEnd::Clean,
        Err(_) => {
            reset_tcp(&client);
            reset_tcp(&node);
            SpliceEnd::TcpAborted
        }
    }
}

/// Copies both ways between two QUIC streams (a peer server's stream and
/// a tunnel's; `outer` → `inner` counts as `tcp_to_quic`): a FIN becomes
/// a FIN, a reset or lost connection on either side resets the other with
/// `abort_code`, and nothing moving for `idle_timeout` resets both.
pub async fn splice_quic(
    outer: (SendStream, RecvStream),
    inner: (SendStream, RecvStream),
    abort_code: u32,
    counters: &ByteCounters,
    idle_timeout: Duration,
) -> SpliceEnd {
    let ((mut outer_send, mut outer_recv), (mut inner_send, mut inner_recv)) = (outer, inner);
    let moved = AtomicU64::new(0);
    async fn pump(r: &mut RecvStream, w: &mut SendStream, count: &AtomicU64, moved: &AtomicU64) -> Result<(), Abort> {
        loop {
            match r.read_chunk(BUF_LEN, true).await {
                Ok(Some(chunk)) => {
                    let n = chunk.bytes.len() as u64;
                    w.write_chunk(chunk.bytes).await.map_err(|_| Abort::Quic)?;
                    count.fetch_add(n, Ordering::Relaxed);
                    moved.fetch_add(1, Ordering::Relaxed);
                }
                Ok(None) => {
                    let _ = w.finish();
                    return Ok(());
                }
                Err(_) => return Err(Abort::Quic),
            }
        }
    }
    let watchdog = idle_watchdog(&moved, idle_timeout);
    let outcome = tokio::select! {
        both = async {
            tokio::try_join!(
                pump(&mut outer_recv, &mut inner_send, &counters.tcp_to_quic, &moved),
                pump(&mut inner_recv, &mut outer_send, &counters.quic_to_tcp, &moved),
            )
        } => both.map(|_| ()),
        idle = watchdog => Err(idle),
    };
    match outcome {
        Ok(()) => SpliceEnd::Clean,
        Err(_) => {
            let code = VarInt::from_u32(abort_code);
            let _ = outer_send.reset(code);
            let _ = outer_recv.stop(code);
            let _ = inner_send.reset(code);
            let _ = inner_recv.stop(code);
            SpliceEnd::QuicAborted
        }
    }
}

/// Resolves once `moved` stayed the same for a whole `idle_timeout`.
async fn idle_watchdog(moved: &AtomicU64, idle_timeout: Duration) -> Abort {
    let mut seen = moved.load(Ordering::Relaxed);
    loop {
        tokio::time::sleep(idle_timeout).await;
        let now = moved.load(Ordering::Relaxed);
        if now == seen {
            return Abort::Idle;
        }
        seen = now;
    }
}

/// Writes every chunk, using vectored writes; returns the byte count.
async fn write_all_vectored<W: AsyncWriteExt + Unpin>(w: &mut W, chunks: &mut [Bytes]) -> std::io::Result<usize> {
    let total: usize = chunks.iter().map(Bytes::len).sum();
    let mut first = 0;
    while first < chunks.len() {
        let slices: Vec<std::io::IoSlice<'_>> = chunks[first..].iter().map(|c| std::io::IoSlice::new(c)).collect();
        let mut written = w.write_vectored(&slices).await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while first < chunks.len() && written >= chunks[first].len() {
            written -= chunks[first].len();
            first += 1;
        }
        if written > 0 {
            chunks[first].advance(written);
        }
    }
    Ok(total)
}

/// Makes the next close of `tcp` send an RST instead of a FIN.
pub fn reset_tcp(tcp: &TcpStream) {
    let _ = socket2::SockRef::from(tcp).set_linger(Some(Duration::ZERO));
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// A connected pair of TCP streams on loopback.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (b, _) = listener.accept().await.unwrap();
        (a, b)
    }

    #[tokio::test]
    async fn tcp_splice_copies_both_ways_with_half_close() {
        let (mut client, client_side) = pair().await;
        let (node_side, mut node) = pair().await;
        let counters = ByteCounters::default();
        let splice = splice_tcp(client_side, node_side, &counters, Duration::from_secs(5));
        let peers = async {
            client.write_all(b"hello node").await.unwrap();
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            node.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"hello node");
            node.write_all(b"hi client!!").await.unwrap();
            node.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            assert_eq!(back, b"hi client!!");
        };
        let (end, ()) = tokio::join!(splice, peers);
        assert_eq!(end, SpliceEnd::Clean);
        assert_eq!(counters.tcp_to_quic.load(Ordering::Relaxed), 10);
        assert_eq!(counters.quic_to_tcp.load(Ordering::Relaxed), 11);
    }

    #[tokio::test]
    async fn tcp_splice_ends_idle_connections() {
        let (_client, client_side) = pair().await;
        let (node_side, _node) = pair().await;
        let counters = ByteCounters::default();
        let start = tokio::time::Instant::now();
        let end = splice_tcp(client_side, node_side, &counters, Duration::from_millis(100)).await;
        assert_eq!(end, SpliceEnd::TcpAborted);
        assert!(start.elapsed() < Duration::from_secs(2));
    }
}
