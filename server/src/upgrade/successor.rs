//! The successor's side of an upgrade: it connects to the handover socket
//! its predecessor named, receives the listening sockets, binds nothing it
//! was given, and steps through `ready` → `take_clients` as the module
//! documentation of [`super`] describes.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::time::Duration;

use edge_proto::handover::{HandoverMessage, OfferedSocket, SocketRole, HANDOVER_VERSION};
use tokio::net::UnixStream;

use super::{fds, UpgradeError, HANDOVER_ENV};

/// Deadline for receiving the offer once connected.
const OFFER_DEADLINE: Duration = Duration::from_secs(10);
/// How long the predecessor may take to move its agents.
const MOVE_DEADLINE: Duration = Duration::from_secs(30);
/// How long the predecessor may take to stop accepting.
const RETIRE_DEADLINE: Duration = Duration::from_secs(10);

/// A successor's link to its predecessor, and the sockets not yet used.
#[derive(Debug)]
pub struct Takeover {
    stream: UnixStream,
    epoch: u8,
    predecessor_pid: u32,
    sockets: Vec<(OfferedSocket, Option<OwnedFd>)>,
}

/// Whether an offered socket bound to `offered` serves a config asking for
/// `wanted` (port 0 asks for any port).
pub fn serves(offered: SocketAddr, wanted: SocketAddr) -> bool {
    offered == wanted || (wanted.port() == 0 && offered.ip() == wanted.ip())
}

impl Takeover {
    /// When this process was started by `edge-server upgrade`: connects to
    /// the predecessor and receives its sockets. `None` on a normal start.
    pub async fn from_env() -> Result<Option<Self>, UpgradeError> {
        let Some(path) = std::env::var_os(HANDOVER_ENV) else { return Ok(None) };
        let stream = UnixStream::connect(&path).await?;
        let (message, fds) = tokio::time::timeout(OFFER_DEADLINE, fds::recv(&stream))
            .await
            .map_err(|_| UpgradeError::Timeout("send its sockets"))??;
        let HandoverMessage::Offer { version, epoch, predecessor_pid, sockets } = message else {
            return Err(UpgradeError::Protocol("the first message is not an offer".into()));
        };
        if version != HANDOVER_VERSION {
            let error = format!("predecessor speaks handover version {version}, this binary {HANDOVER_VERSION}");
            let _ = fds::send(&stream, &HandoverMessage::Failed { error: error.clone() }, &[]).await;
            return Err(UpgradeError::Protocol(error));
        }
        if fds.len() != sockets.len() {
            return Err(UpgradeError::Protocol(format!(
                "{} sockets listed, {} descriptors received",
                sockets.len(),
                fds.len()
            )));
        }
        let sockets = sockets.into_iter().zip(fds.into_iter().map(Some)).collect();
        Ok(Some(Self { stream, epoch: epoch & 1, predecessor_pid, sockets }))
    }

    /// The QUIC epoch this process uses.
    pub fn epoch(&self) -> u8 {
        self.epoch
    }

    /// The predecessor's process id.
    pub fn predecessor_pid(&self) -> u32 {
        self.predecessor_pid
    }

    fn take(&mut self, role: SocketRole, wanted: Option<SocketAddr>) -> Option<OwnedFd> {
        let (_, fd) = self.sockets.iter_mut().find(|(offered, fd)| {
            fd.is_some()
                && offered.role == role
                && match (offered.addr, wanted) {
                    (Some(offered), Some(wanted)) => serves(offered, wanted),
                    (None, None) => true,
                    _ => false,
                }
        })?;
        fd.take()
    }

    /// The predecessor's TCP listener for `role` if it serves `wanted`.
    pub fn take_tcp(&mut self, role: SocketRole, wanted: SocketAddr) -> Option<std::net::TcpListener> {
        self.take(role, Some(wanted)).map(std::net::TcpListener::from)
    }

    /// The predecessor's UDP socket for `role` if it serves `wanted`.
    pub fn take_udp(&mut self, role: SocketRole, wanted: SocketAddr) -> Option<std::net::UdpSocket> {
        self.take(role, Some(wanted)).map(std::net::UdpSocket::from)
    }

    /// The control socket's listener.
    pub fn take_control(&mut self) -> Option<std::os::unix::net::UnixListener> {
        self.take(SocketRole::Control, None).map(std::os::unix::net::UnixListener::from)
    }

    /// This process's end of the QUIC forwarding socket.
    pub fn take_forward(&mut self) -> Option<std::os::unix::net::UnixDatagram> {
        self.take(SocketRole::QuicForward, None).map(std::os::unix::net::UnixDatagram::from)
    }

    /// Sockets offered but not used (the config changed); `ready` closes
    /// them here (they stay open in the predecessor until it exits).
    pub fn unused(&self) -> Vec<OfferedSocket> {
        self.sockets.iter().filter(|(_, fd)| fd.is_some()).map(|(offered, _)| offered.clone()).collect()
    }

    /// Tells the predecessor this process cannot take over.
    pub async fn fail(&self, error: &str) {
        let message = HandoverMessage::Failed { error: error.to_string() };
        let _ = tokio::time::timeout(Duration::from_secs(2), fds::send(&self.stream, &message, &[])).await;
    }

    async fn next(&self, deadline: Duration, step: &'static str) -> Result<HandoverMessage, UpgradeError> {
        match tokio::time::timeout(deadline, fds::recv_plain(&self.stream)).await {
            Err(_) => Err(UpgradeError::Timeout(step)),
            Ok(Err(e)) => Err(e),
            Ok(Ok(HandoverMessage::Failed { error })) => Err(UpgradeError::Refused(error)),
            Ok(Ok(message)) => Ok(message),
        }
    }

    /// Says this process serves (no clients yet); returns the nodes whose
    /// agents the predecessor asked to connect here.
    pub async fn ready(&mut self) -> Result<Vec<String>, UpgradeError> {
        self.sockets.clear();
        fds::send(&self.stream, &HandoverMessage::Ready { pid: std::process::id() }, &[]).await?;
        match self.next(MOVE_DEADLINE, "move its agents").await? {
            HandoverMessage::AgentsMoving { nodes } => Ok(nodes),
            other => Err(UpgradeError::Protocol(format!("expected agents_moving, got {other:?}"))),
        }
    }

    /// Says this process accepts clients now; returns how many connections
    /// the predecessor still drains.
    pub async fn take_clients(&mut self, missing: Vec<String>) -> Result<u64, UpgradeError> {
        fds::send(&self.stream, &HandoverMessage::TakeClients { missing }, &[]).await?;
        match self.next(RETIRE_DEADLINE, "stop accepting").await? {
            HandoverMessage::Retired { open_connections } => Ok(open_connections),
            other => Err(UpgradeError::Protocol(format!("expected retired, got {other:?}"))),
        }
    }

    /// Resolves when the predecessor has exited.
    pub async fn predecessor_gone(self) {
        let mut byte = [0u8; 1];
        loop {
            if self.stream.readable().await.is_err() {
                return;
            }
            match self.stream.try_read(&mut byte) {
                Ok(_) => return,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_socket_serves_its_address_or_any_port_on_its_ip() {
        let a: SocketAddr = "127.0.0.1:443".parse().unwrap();
        assert!(serves(a, a));
        assert!(serves(a, "127.0.0.1:0".parse().unwrap()));
        assert!(!serves(a, "127.0.0.1:444".parse().unwrap()));
        assert!(!serves(a, "127.0.0.2:0".parse().unwrap()));
        assert!(!serves(a, "0.0.0.0:443".parse().unwrap()));
    }
}
