//! Noticing our own connections when they come back to us.
//!
//! The endpoint rules ([`crate::endpoints`]) refuse every address we know to
//! be ours, but some paths back to us cannot be seen from an address: a
//! hairpin NAT, a forwarder the node points at our :443. Two checks catch
//! what arrives anyway, on the client listeners, once the first bytes are
//! read:
//! - the peer is the local end of a connection we opened ourselves (a probe
//!   or a fallback splice), registered here while it is open;
//! - the ClientHello is, byte for byte, one we are forwarding on a fallback
//!   splice right now: raw TLS passes any forwarder unchanged, so a
//!   fallback that reaches us again is refused at the second hop instead of
//!   looping.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::TcpStream;

/// Connections and ClientHellos of ours that are in flight.
#[derive(Debug, Default)]
pub struct SelfLoops {
    /// Local addresses of connections we opened, with a count (a port can
    /// be reused once closed, never while open).
    local_ends: Mutex<HashMap<SocketAddr, usize>>,
    /// Hashes of ClientHellos being forwarded by fallback splices.
    hellos: Mutex<HashMap<u64, usize>>,
    /// Entries in each table: the common case (nothing of the kind in
    /// flight) costs a client connection one atomic load, no lock and no
    /// hash of its ClientHello.
    local_in_flight: AtomicUsize,
    hellos_in_flight: AtomicUsize,
    hasher: RandomState,
}

/// What one registration holds; unregisters when dropped.
#[derive(Debug)]
pub struct InFlight {
    loops: Arc<SelfLoops>,
    entry: Entry,
}

#[derive(Debug)]
enum Entry {
    LocalEnd(SocketAddr),
    Hello(u64),
}

fn enter<K: std::hash::Hash + Eq>(table: &Mutex<HashMap<K, usize>>, key: K) {
    *table.lock().unwrap_or_else(|p| p.into_inner()).entry(key).or_insert(0) += 1;
}

fn leave<K: std::hash::Hash + Eq>(table: &Mutex<HashMap<K, usize>>, key: &K) {
    let mut table = table.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(n) = table.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            table.remove(key);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        match &self.entry {
            Entry::LocalEnd(addr) => {
                leave(&self.loops.local_ends, addr);
                self.loops.local_in_flight.fetch_sub(1, Ordering::Relaxed);
            }
            Entry::Hello(hash) => {
                leave(&self.loops.hellos, hash);
                self.loops.hellos_in_flight.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

impl SelfLoops {
    /// Connects to `addr`, registering the connection's local end before
    /// anything is written on it (so the far side, if it is us, sees it
    /// registered by the time it reads a byte).
    pub async fn connect(self: &Arc<Self>, addr: SocketAddr) -> std::io::Result<(TcpStream, InFlight)> {
        let tcp = TcpStream::connect(addr).await?;
        let local = tcp.local_addr()?;
        let local = SocketAddr::new(local.ip().to_canonical(), local.port());
        enter(&self.local_ends, local);
        self.local_in_flight.fetch_add(1, Ordering::Relaxed);
        Ok((tcp, InFlight { loops: self.clone(), entry: Entry::LocalEnd(local) }))
    }

    /// Registers a ClientHello about to be forwarded on a fallback splice.
    pub fn forwarding(self: &Arc<Self>, hello: &[u8]) -> InFlight {
        let hash = self.hasher.hash_one(hello);
        enter(&self.hellos, hash);
        self.hellos_in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight { loops: self.clone(), entry: Entry::Hello(hash) }
    }

    /// Whether a client connection from `peer` that sent `hello` is one of
    /// ours come back.
    pub fn is_ours(&self, peer: SocketAddr, hello: &[u8]) -> bool {
        if self.local_in_flight.load(Ordering::Relaxed) > 0 {
            let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
            if self.local_ends.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&peer) {
                return true;
            }
        }
        self.hellos_in_flight.load(Ordering::Relaxed) > 0
            && self.hellos.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&self.hasher.hash_one(hello))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn our_own_connections_and_forwarded_hellos_are_recognised() {
        let loops = Arc::new(SelfLoops::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = listener.local_addr().unwrap();
        assert!(!loops.is_ours("127.0.0.1:1".parse().unwrap(), b"hello"), "nothing in flight");

        // A connection we open, seen from the listening side.
        let (ours, guard) = loops.connect(target).await.unwrap();
        let (_accepted, peer) = listener.accept().await.unwrap();
        assert!(loops.is_ours(peer, b"any"));
        // Somebody else's connection is not.
        let _theirs = TcpStream::connect(target).await.unwrap();
        let (_accepted2, other) = listener.accept().await.unwrap();
        assert!(!loops.is_ours(other, b"any"));
        drop(guard);
        drop(ours);
        assert!(!loops.is_ours(peer, b"any"), "released with its guard");

        // A ClientHello being forwarded, coming back from anywhere.
        let hello = edge_proto_hello();
        let forwarded = loops.forwarding(&hello);
        let twice = loops.forwarding(&hello);
        assert!(loops.is_ours(other, &hello));
        assert!(!loops.is_ours(other, b"another hello"));
        drop(forwarded);
        assert!(loops.is_ours(other, &hello), "still forwarded once");
        drop(twice);
        assert!(!loops.is_ours(other, &hello));
        assert_eq!(loops.local_in_flight.load(Ordering::Relaxed), 0);
        assert_eq!(loops.hellos_in_flight.load(Ordering::Relaxed), 0);
    }

    fn edge_proto_hello() -> Vec<u8> {
        let mut hello = vec![0x16, 0x03, 0x01];
        hello.extend_from_slice(&[7u8; 64]);
        hello
    }
}
