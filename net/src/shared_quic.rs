//! A QUIC UDP socket two server processes can share during an upgrade.
//!
//! The kernel hands each datagram of a shared socket to whichever process
//! reads first, but a QUIC connection lives in one process: datagrams of
//! the other's connections must reach it, or it answers them with a
//! stateless reset and the connection dies. So every connection ID this
//! endpoint issues carries the process's epoch ([`EpochCids`]), and while a
//! peer process is set, datagrams of the other epoch (and, when this
//! process does not accept connections, those that open one) are passed to
//! it over a Unix datagram socket instead of to quinn. Datagrams the peer
//! passes here are never passed back, so none can loop. Without a peer the
//! socket is a plain quinn socket: one check per datagram.

use std::fmt;
use std::future::Future;
use std::hash::BuildHasher;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{ready, Context, Poll, Waker};

use edge_proto::handover::{self, Destination, Forwarded, FORWARD_HEADER_LEN, SERVER_CID_LEN};
use quinn::udp::{EcnCodepoint, RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncUdpSocket, ConnectionId, ConnectionIdGenerator, UdpPoller};
use tokio::io::{Interest, ReadBuf};
use tokio::net::UnixDatagram;

/// Largest forwarded datagram (a UDP payload plus the header).
const FORWARD_MAX: usize = 65_535 + FORWARD_HEADER_LEN;

/// Counters of what crossed between the processes.
#[derive(Debug, Default)]
pub struct ForwardStats {
    /// Datagrams passed to the peer.
    pub passed: AtomicU64,
    /// Datagrams the peer passed here.
    pub received: AtomicU64,
    /// Datagrams that could not be passed (the peer's queue was full, or it
    /// is gone); QUIC repairs the loss.
    pub dropped: AtomicU64,
}

/// The socket; see the module documentation.
pub struct SharedQuicSocket {
    io: tokio::net::UdpSocket,
    state: UdpSocketState,
    epoch: u8,
    /// Whether this process reads the UDP socket (a retired one only gets
    /// what the peer passes it).
    reads_udp: AtomicBool,
    /// Whether this process takes datagrams that open connections.
    accepts: AtomicBool,
    peer: RwLock<Option<Arc<UnixDatagram>>>,
    /// Receive scratch for forwarded datagrams (quinn's buffers may be
    /// smaller than header plus payload); only the endpoint driver reads.
    inbox: Mutex<Vec<u8>>,
    /// Send scratch for forwarding.
    outbox: Mutex<Vec<u8>>,
    /// The endpoint driver's waker, woken when a setter changes what it
    /// must poll (it may be waiting on neither socket).
    driver: Mutex<Option<Waker>>,
    stats: ForwardStats,
}

impl fmt::Debug for SharedQuicSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedQuicSocket")
            .field("local", &self.io.local_addr().ok())
            .field("epoch", &self.epoch)
            .field("reads_udp", &self.reads_udp.load(Ordering::Relaxed))
            .field("accepts", &self.accepts.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl SharedQuicSocket {
    /// Wraps a bound UDP socket for a process of `epoch` (0 or 1), reading
    /// it and accepting connections, with no peer.
    pub fn new(socket: std::net::UdpSocket, epoch: u8) -> io::Result<Arc<Self>> {
        socket.set_nonblocking(true)?;
        let state = UdpSocketState::new((&socket).into())?;
        Ok(Arc::new(Self {
            io: tokio::net::UdpSocket::from_std(socket)?,
            state,
            epoch: epoch & 1,
            reads_udp: AtomicBool::new(true),
            accepts: AtomicBool::new(true),
            peer: RwLock::new(None),
            inbox: Mutex::new(vec![0; FORWARD_MAX]),
            outbox: Mutex::new(Vec::with_capacity(FORWARD_MAX)),
            driver: Mutex::new(None),
            stats: ForwardStats::default(),
        }))
    }

    /// This process's epoch.
    pub fn epoch(&self) -> u8 {
        self.epoch
    }

    /// Sets (or clears) the peer process's forwarding socket.
    pub fn set_peer(&self, peer: Option<UnixDatagram>) {
        *self.peer.write().unwrap_or_else(|p| p.into_inner()) = peer.map(Arc::new);
        self.wake_driver();
    }

    fn wake_driver(&self) {
        if let Some(waker) = self.driver.lock().unwrap_or_else(|p| p.into_inner()).take() {
            waker.wake();
        }
    }

    /// Whether a peer is set.
    pub fn has_peer(&self) -> bool {
        self.peer.read().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// Whether datagrams that open connections are taken here (else they
    /// go to the peer, when there is one).
    pub fn set_accepting(&self, accepts: bool) {
        self.accepts.store(accepts, Ordering::Relaxed);
    }

    /// Whether this process reads the UDP socket itself.
    pub fn set_reading(&self, reads: bool) {
        self.reads_udp.store(reads, Ordering::Relaxed);
        self.wake_driver();
    }

    /// What crossed between the processes so far.
    pub fn stats(&self) -> &ForwardStats {
        &self.stats
    }

    /// Whether a datagram is for this process.
    fn is_local(&self, datagram: &[u8]) -> bool {
        match handover::classify(datagram) {
            Destination::Acceptor => self.accepts.load(Ordering::Relaxed),
            Destination::Epoch(epoch) => epoch == self.epoch,
            Destination::Reader => true,
        }
    }

    fn pass(&self, peer: &UnixDatagram, meta: &RecvMeta, datagram: &[u8]) {
        let mut out = self.outbox.lock().unwrap_or_else(|p| p.into_inner());
        out.clear();
        let header = Forwarded { source: meta.addr, destination: meta.dst_ip, ecn: meta.ecn.map_or(0, |e| e as u8) };
        handover::encode_forwarded(&header, datagram, &mut out);
        match peer.try_send(&out) {
            Ok(_) => self.stats.passed.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.stats.dropped.fetch_add(1, Ordering::Relaxed),
        };
    }

    /// Passes the datagrams of `meta[..n]` that are not for this process to
    /// the peer, compacting what stays in each buffer (GRO batches hold
    /// several).
    fn sort(&self, peer: &UnixDatagram, bufs: &mut [IoSliceMut<'_>], meta: &mut [RecvMeta], n: usize) {
        for (buf, m) in bufs.iter_mut().zip(meta.iter_mut()).take(n) {
            let stride = m.stride.max(1);
            let (mut read, mut write) = (0, 0);
            while read < m.len {
                let end = (read + stride).min(m.len);
                if self.is_local(&buf[read..end]) {
                    if write != read {
                        buf.copy_within(read..end, write);
                    }
                    write += end - read;
                } else {
                    self.pass(peer, m, &buf[read..end]);
                }
                read = end;
            }
            // quinn skips a buffer of length 0.
            m.len = write;
        }
    }

    /// One datagram the peer passed, into `buf`/`meta`.
    fn poll_peer(&self, peer: &UnixDatagram, cx: &mut Context, buf: &mut [u8], meta: &mut RecvMeta) -> Poll<bool> {
        let mut inbox = self.inbox.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let mut read = ReadBuf::new(&mut inbox[..]);
            match peer.poll_recv(cx, &mut read) {
                Poll::Pending => return Poll::Pending,
                // The peer is gone: its socket reports it no more.
                Poll::Ready(Err(_)) => return Poll::Ready(false),
                Poll::Ready(Ok(())) => {}
            }
            let Ok((header, payload)) = handover::decode_forwarded(read.filled()) else { continue };
            if payload.is_empty() || payload.len() > buf.len() {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            buf[..payload.len()].copy_from_slice(payload);
            *meta = RecvMeta {
                addr: header.source,
                len: payload.len(),
                stride: payload.len(),
                ecn: EcnCodepoint::from_bits(header.ecn),
                dst_ip: header.destination,
            };
            self.stats.received.fetch_add(1, Ordering::Relaxed);
            return Poll::Ready(true);
        }
    }
}

impl AsyncUdpSocket for SharedQuicSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(Writable { socket: self, waiting: None })
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.io.try_io(Interest::WRITABLE, || self.state.send((&self.io).into(), transmit))
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        {
            let mut driver = self.driver.lock().unwrap_or_else(|p| p.into_inner());
            if !driver.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *driver = Some(cx.waker().clone());
            }
        }
        let mut peer = self.peer.read().unwrap_or_else(|p| p.into_inner()).clone();
        if let (Some(link), Some(buf), Some(m)) = (&peer, bufs.first_mut(), meta.first_mut()) {
            if let Poll::Ready(got) = self.poll_peer(link, cx, buf, m) {
                if got {
                    return Poll::Ready(Ok(1));
                }
                // The peer is gone.
                *self.peer.write().unwrap_or_else(|p| p.into_inner()) = None;
                peer = None;
            }
        }
        if !self.reads_udp.load(Ordering::Relaxed) {
            // Woken by the peer's socket, or by a setter.
            return Poll::Pending;
        }
        loop {
            ready!(self.io.poll_recv_ready(cx))?;
            let Ok(n) = self.io.try_io(Interest::READABLE, || self.state.recv((&self.io).into(), bufs, meta)) else {
                continue;
            };
            if let Some(peer) = &peer {
                // Buffers passed on whole are left empty (quinn skips them);
                // returning after each batch keeps quinn's receive budget
                // in charge even when every datagram goes to the peer.
                self.sort(peer, bufs, meta, n);
            }
            return Poll::Ready(Ok(n));
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.io.local_addr()
    }

    fn may_fragment(&self) -> bool {
        self.state.may_fragment()
    }

    fn max_transmit_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.state.gro_segments()
    }
}

type WritableFuture = Pin<Box<dyn Future<Output = io::Result<()>> + Send + Sync>>;

/// Waits for the socket to be writable; one per waiting task, so that each
/// keeps its own waker.
struct Writable {
    socket: Arc<SharedQuicSocket>,
    waiting: Option<WritableFuture>,
}

impl fmt::Debug for Writable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Writable").finish_non_exhaustive()
    }
}

impl UdpPoller for Writable {
    fn poll_writable(mut self: Pin<&mut Self>, cx: &mut Context) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let socket = this.socket.clone();
        let waiting = this.waiting.get_or_insert_with(|| Box::pin(async move { socket.io.writable().await }));
        let result = waiting.as_mut().poll(cx);
        if result.is_ready() {
            this.waiting = None;
        }
        result
    }
}

/// Connection IDs of [`SERVER_CID_LEN`] bytes: the epoch in the top bit,
/// a random nonce, and a keyed hash that lets quinn drop datagrams whose ID
/// this process never issued without answering them.
pub struct EpochCids {
    epoch: u8,
    key: std::hash::RandomState,
}

impl fmt::Debug for EpochCids {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EpochCids").field("epoch", &self.epoch).finish_non_exhaustive()
    }
}

/// Bytes of nonce; the rest is the signature.
const NONCE_LEN: usize = 4;

impl EpochCids {
    /// A generator for `epoch`, with a fresh key.
    pub fn new(epoch: u8) -> Self {
        Self { epoch: epoch & 1, key: std::hash::RandomState::new() }
    }

    fn signature(&self, nonce: &[u8]) -> [u8; SERVER_CID_LEN - NONCE_LEN] {
        let hash = self.key.hash_one(nonce).to_le_bytes();
        let mut out = [0; SERVER_CID_LEN - NONCE_LEN];
        out.copy_from_slice(&hash[..SERVER_CID_LEN - NONCE_LEN]);
        out
    }
}

impl ConnectionIdGenerator for EpochCids {
    fn generate_cid(&mut self) -> ConnectionId {
        let mut bytes = [0u8; SERVER_CID_LEN];
        let nonce: [u8; NONCE_LEN] = rand::random();
        bytes[..NONCE_LEN].copy_from_slice(&nonce);
        bytes[0] = handover::mark_cid(bytes[0], self.epoch);
        let signature = self.signature(&bytes[..NONCE_LEN]);
        bytes[NONCE_LEN..].copy_from_slice(&signature);
        ConnectionId::new(&bytes)
    }

    fn validate(&self, cid: &ConnectionId) -> Result<(), quinn_proto::InvalidCid> {
        let ok = cid.len() == SERVER_CID_LEN
            && handover::cid_epoch(cid[0]) == self.epoch
            && cid[NONCE_LEN..] == self.signature(&cid[..NONCE_LEN]);
        if ok {
            Ok(())
        } else {
            Err(quinn_proto::InvalidCid)
        }
    }

    fn cid_len(&self) -> usize {
        SERVER_CID_LEN
    }

    fn cid_lifetime(&self) -> Option<std::time::Duration> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Datagrams `socket` hands quinn, one `poll_recv` at a time, until
    /// `want` arrived.
    async fn received(socket: &SharedQuicSocket, want: usize) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut out = Vec::new();
        let mut storage = vec![vec![0u8; 65_536]; 4];
        while out.len() < want {
            let mut bufs: Vec<IoSliceMut<'_>> = storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            let mut meta = vec![RecvMeta::default(); bufs.len()];
            let n = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                std::future::poll_fn(|cx| socket.poll_recv(cx, &mut bufs, &mut meta)),
            )
            .await
            .expect("datagrams within 5 s")
            .unwrap();
            for (buf, m) in bufs.iter().zip(&meta).take(n) {
                for datagram in buf[..m.len].chunks(m.stride.max(1)) {
                    out.push((m.addr, datagram.to_vec()));
                }
            }
        }
        out
    }

    fn short(epoch: u8, size: usize) -> Vec<u8> {
        let mut d = vec![0x40, handover::mark_cid(0x11, epoch), 2, 3, 4, 5, 6, 7, 8];
        d.resize(size, 0xee);
        d
    }

    #[tokio::test]
    async fn the_other_epochs_datagrams_are_passed_and_the_peers_received() {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = udp.local_addr().unwrap();
        let socket = SharedQuicSocket::new(udp, 0).unwrap();
        let (mine, theirs) = UnixDatagram::pair().unwrap();
        socket.set_peer(Some(mine));
        socket.set_accepting(false);
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let client_addr = client.local_addr().unwrap();
        let mut initial = vec![0xc0, 0, 0, 0, 1, 20];
        initial.extend_from_slice(&[0x80; 20]);
        initial.resize(1200, 0);
        let sent = [short(0, 100), short(1, 200), initial.clone(), vec![0x40], short(0, 300), short(1, 400)];
        for d in &sent {
            client.send_to(d, addr).unwrap();
        }
        let kept = received(&socket, 3).await;
        let kept: Vec<Vec<u8>> = kept
            .into_iter()
            .map(|(from, d)| {
                assert_eq!(from, client_addr);
                d
            })
            .collect();
        assert_eq!(kept, vec![sent[0].clone(), sent[3].clone(), sent[4].clone()]);
        // The peer got the other epoch's and the Initial (this side does
        // not accept connections), with the client's address.
        let mut passed = Vec::new();
        let mut buf = vec![0u8; FORWARD_MAX];
        for _ in 0..3 {
            let n =
                tokio::time::timeout(std::time::Duration::from_secs(5), theirs.recv(&mut buf)).await.unwrap().unwrap();
            let (header, payload) = handover::decode_forwarded(&buf[..n]).unwrap();
            assert_eq!(header.source, client_addr);
            passed.push(payload.to_vec());
        }
        assert_eq!(passed, vec![sent[1].clone(), initial, sent[5].clone()]);
        assert_eq!(socket.stats().passed.load(Ordering::Relaxed), 3);

        // What the peer passes here is handed to quinn as from its source.
        let mut forwarded = Vec::new();
        let source: SocketAddr = "192.0.2.9:4433".parse().unwrap();
        handover::encode_forwarded(&Forwarded { source, destination: None, ecn: 2 }, &short(1, 77), &mut forwarded);
        theirs.send(&forwarded).await.unwrap();
        assert_eq!(received(&socket, 1).await, vec![(source, short(1, 77))]);

        // Retired and alone: nothing is read from the UDP socket any more.
        socket.set_reading(false);
        client.send_to(&short(0, 50), addr).unwrap();
        let poll = tokio::time::timeout(std::time::Duration::from_millis(200), received(&socket, 1)).await;
        assert!(poll.is_err(), "a retired socket reads only its peer");
        // A datagram pair reports no hang-up (the handover stream does):
        // with the peer gone, reading resumes on request and nothing spins.
        drop(theirs);
        socket.set_reading(true);
        assert_eq!(received(&socket, 1).await, vec![(client_addr, short(0, 50))]);
        socket.set_peer(None);
        assert!(!socket.has_peer());
    }

    #[test]
    fn generated_ids_carry_the_epoch_and_validate_only_here() {
        for epoch in [0u8, 1] {
            let mut generator = EpochCids::new(epoch);
            let other = EpochCids::new(epoch);
            for _ in 0..64 {
                let cid = generator.generate_cid();
                assert_eq!(cid.len(), SERVER_CID_LEN);
                assert_eq!(handover::cid_epoch(cid[0]), epoch);
                assert!(generator.validate(&cid).is_ok());
                // Another process's key does not vouch for it.
                assert!(other.validate(&cid).is_err());
            }
        }
    }
}
