//! Connection IDs that name their tunnel (issue 17): the agent's HTTP/3
//! endpoint issues IDs of [`ROUTABLE_CID_LEN`] bytes that start with the
//! tunnel's [`RouteId`], so the server routes every later packet of the
//! connection, from whatever client address, by the ID alone (the idea of
//! QUIC-LB). The rest is a random nonce and a keyed hash, so the endpoint
//! drops packets under IDs it never issued without answering them.

use std::fmt;
use std::hash::BuildHasher;

use edge_proto::quic_route::{RouteId, ROUTABLE_CID_LEN};
use quinn::{ConnectionId, ConnectionIdGenerator};

/// Bytes of nonce after the route; the rest is the signature.
const NONCE_LEN: usize = 4;
/// Where the signature starts.
const SIGNED_LEN: usize = 4 + NONCE_LEN;

/// The generator; see the module documentation.
pub struct RouteCids {
    route: RouteId,
    key: std::hash::RandomState,
}

impl fmt::Debug for RouteCids {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouteCids").field("route", &self.route).finish_non_exhaustive()
    }
}

impl RouteCids {
    /// A generator for `route` with `key` (one key per endpoint: every
    /// generator of the endpoint must accept the others' IDs).
    pub fn new(route: RouteId, key: std::hash::RandomState) -> Self {
        Self { route, key }
    }

    fn signature(&self, signed: &[u8]) -> [u8; ROUTABLE_CID_LEN - SIGNED_LEN] {
        let hash = self.key.hash_one(signed).to_le_bytes();
        let mut out = [0; ROUTABLE_CID_LEN - SIGNED_LEN];
        out.copy_from_slice(&hash[..ROUTABLE_CID_LEN - SIGNED_LEN]);
        out
    }
}

impl ConnectionIdGenerator for RouteCids {
    fn generate_cid(&mut self) -> ConnectionId {
        let mut random = [0u8; ROUTABLE_CID_LEN - 4];
        random[..NONCE_LEN].copy_from_slice(&rand::random::<[u8; NONCE_LEN]>());
        let mut bytes = self.route.connection_id(random);
        let signature = self.signature(&bytes[..SIGNED_LEN]);
        bytes[SIGNED_LEN..].copy_from_slice(&signature);
        ConnectionId::new(&bytes)
    }

    fn validate(&self, cid: &ConnectionId) -> Result<(), quinn_proto::InvalidCid> {
        let ok = cid.len() == ROUTABLE_CID_LEN
            && RouteId::of(cid) == Some(self.route)
            && cid[SIGNED_LEN..] == self.signature(&cid[..SIGNED_LEN]);
        if ok {
            Ok(())
        } else {
            Err(quinn_proto::InvalidCid)
        }
    }

    fn cid_len(&self) -> usize {
        ROUTABLE_CID_LEN
    }

    fn cid_lifetime(&self) -> Option<std::time::Duration> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_carry_the_route_and_only_issued_ones_validate() {
        let key = std::hash::RandomState::new();
        let mut cids = RouteCids::new(RouteId(0xdead_beef), key.clone());
        let a = cids.generate_cid();
        let b = cids.generate_cid();
        assert_ne!(a, b);
        for cid in [&a, &b] {
            assert_eq!(cid.len(), ROUTABLE_CID_LEN);
            assert_eq!(RouteId::of(cid), Some(RouteId(0xdead_beef)));
            assert!(cids.validate(cid).is_ok());
        }
        let mut forged = a.to_vec();
        forged[15] ^= 1;
        assert!(cids.validate(&ConnectionId::new(&forged)).is_err(), "a changed signature");
        let other = RouteCids::new(RouteId(7), key).generate_cid();
        assert!(cids.validate(&other).is_err(), "another route's id");
        assert!(cids.validate(&ConnectionId::new(&a[..8])).is_err(), "a short id");
    }
}
