//! A "UDP socket" for a quinn endpoint whose datagrams travel inside a
//! tunnel: the agent's HTTP/3 endpoint (issue 17) sends and receives its
//! clients' datagrams as the tunnel connection's QUIC DATAGRAM frames,
//! each prefixed with the client's address ([`edge_proto::quic_datagram`]).
//!
//! Like UDP, nothing here waits or retries: a datagram the tunnel cannot
//! take now (too large for its current path with no frame stream free, or
//! the queue toward the endpoint is full) is dropped and counted, and the QUIC connections on
//! either side repair the loss. The endpoint sees one datagram per
//! receive and sends one per transmit (no GSO or GRO), so every datagram
//! gets its own tunnel frame.

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use edge_proto::quic_datagram;
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::sync::mpsc;

/// What crossed the socket, for metrics.
#[derive(Debug, Default)]
pub struct TunnelUdpStats {
    /// Datagrams handed to the endpoint.
    pub received: AtomicU64,
    /// Bytes handed to the endpoint.
    pub received_bytes: AtomicU64,
    /// Datagrams the endpoint sent into the tunnel.
    pub sent: AtomicU64,
    /// Bytes the endpoint sent into the tunnel.
    pub sent_bytes: AtomicU64,
    /// Datagrams dropped: the tunnel could not take them (too large for its
    /// path now, or the tunnel is gone), or the endpoint's queue was full.
    pub dropped: AtomicU64,
    /// Datagrams sent on frame streams (too large for a DATAGRAM frame).
    pub sent_on_streams: AtomicU64,
    /// Datagrams received on frame streams.
    pub received_on_streams: AtomicU64,
}

/// The socket; see the module documentation.
pub struct TunnelUdpSocket {
    tunnel: quinn::Connection,
    /// Where frames too large for a DATAGRAM frame go, when the server
    /// takes them.
    streams: Option<crate::frame_streams::FrameStreams>,
    inbound: Mutex<mpsc::Receiver<(SocketAddr, Bytes)>>,
    local: SocketAddr,
    stats: Arc<TunnelUdpStats>,
}

impl fmt::Debug for TunnelUdpSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TunnelUdpSocket").field("local", &self.local).finish_non_exhaustive()
    }
}

/// Hands the tunnel's incoming datagrams to a [`TunnelUdpSocket`].
#[derive(Debug, Clone)]
pub struct Feeder {
    queue: mpsc::Sender<(SocketAddr, Bytes)>,
    stats: Arc<TunnelUdpStats>,
}

impl Feeder {
    /// Queues one tunnel frame for the endpoint; a frame that does not
    /// decode, or that finds the queue full, is dropped. False once the
    /// endpoint is gone.
    pub fn feed(&self, frame: Bytes) -> bool {
        let Ok((client, datagram)) = quic_datagram::decode(&frame) else {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return true;
        };
        let datagram = frame.slice_ref(datagram);
        match self.queue.try_send((client, datagram)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

impl TunnelUdpSocket {
    /// A socket sending into `tunnel`, with a queue of `queue` datagrams
    /// toward the endpoint, fed by the returned [`Feeder`]. `local` is the
    /// address the endpoint believes it has (the server's public one).
    /// With `streams`, frames too large for a DATAGRAM frame go on frame
    /// streams ([`crate::frame_streams`]).
    pub fn new(
        tunnel: quinn::Connection,
        local: SocketAddr,
        queue: usize,
        stats: Arc<TunnelUdpStats>,
        streams: bool,
    ) -> (Arc<Self>, Feeder) {
        let (tx, rx) = mpsc::channel(queue.max(1));
        let streams = streams.then(|| crate::frame_streams::FrameStreams::new(tunnel.clone()));
        let socket = Arc::new(Self { tunnel, streams, inbound: Mutex::new(rx), local, stats: stats.clone() });
        (socket, Feeder { queue: tx, stats })
    }

    fn send_one(&self, destination: SocketAddr, datagram: &[u8]) {
        let mut frame = Vec::with_capacity(quic_datagram::HEADER_LEN_V6 + datagram.len());
        quic_datagram::encode(destination, datagram, &mut frame);
        // A clone of `Bytes` is a reference count: the frame stays at hand
        // for a stream if the tunnel finds it too large.
        let frame = Bytes::from(frame);
        let counter = match self.tunnel.send_datagram(frame.clone()) {
            Ok(()) => {
                self.stats.sent_bytes.fetch_add(datagram.len() as u64, Ordering::Relaxed);
                &self.stats.sent
            }
            Err(quinn::SendDatagramError::TooLarge) => match &self.streams {
                Some(streams) if streams.send(&frame) => &self.stats.sent_on_streams,
                _ => &self.stats.dropped,
            },
            Err(_) => &self.stats.dropped,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

impl AsyncUdpSocket for TunnelUdpSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(AlwaysWritable)
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let size = transmit.segment_size.unwrap_or(transmit.contents.len()).max(1);
        for datagram in transmit.contents.chunks(size) {
            self.send_one(transmit.destination, datagram);
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut inbound = self.inbound.lock().unwrap_or_else(|p| p.into_inner());
        let mut filled = 0;
        while filled < bufs.len().min(meta.len()) {
            let next = if filled == 0 {
                match inbound.poll_recv(cx) {
                    Poll::Ready(Some(next)) => next,
                    // The feeder is gone with its tunnel: nothing more comes.
                    Poll::Ready(None) => return Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
                    Poll::Pending => return Poll::Pending,
                }
            } else {
                match inbound.try_recv() {
                    Ok(next) => next,
                    Err(_) => break,
                }
            };
            let (client, datagram) = next;
            let buf = &mut bufs[filled];
            if datagram.len() > buf.len() {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            buf[..datagram.len()].copy_from_slice(&datagram);
            meta[filled] =
                RecvMeta { addr: client, len: datagram.len(), stride: datagram.len(), ecn: None, dst_ip: None };
            self.stats.received.fetch_add(1, Ordering::Relaxed);
            self.stats.received_bytes.fetch_add(datagram.len() as u64, Ordering::Relaxed);
            filled += 1;
        }
        if filled == 0 {
            // Every datagram taken was too large: look again later.
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(Ok(filled))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }

    fn may_fragment(&self) -> bool {
        false
    }

    fn max_transmit_segments(&self) -> usize {
        1
    }

    fn max_receive_segments(&self) -> usize {
        1
    }
}

/// The tunnel never blocks a sender: what it cannot take is dropped.
#[derive(Debug)]
struct AlwaysWritable;

impl UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
