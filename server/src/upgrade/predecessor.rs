//! The running server's side of an upgrade: start the successor, pass it
//! the sockets, move the agents, then retire (see [`super`]). Any failure
//! before the successor takes clients undoes what was done: the running
//! server accepts agents again, and a successor still running is stopped.

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use edge_net::shared_quic::SharedQuicSocket;
use edge_proto::handover::{ControlEvent, HandoverMessage, OfferedSocket, SocketRole, HANDOVER_VERSION};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{fds, Successor, UpgradeError, HANDOVER_ENV};
use crate::state::Shared;

/// How long the successor may take to connect to the handover socket.
const CONNECT_DEADLINE: Duration = Duration::from_secs(30);
/// How long it may take to open the store and bind (migrations included).
const READY_DEADLINE: Duration = Duration::from_secs(60);
/// How long it may take to see the agents' tunnels and accept clients.
const TAKE_DEADLINE: Duration = Duration::from_secs(60);
/// Send buffer of the QUIC forwarding socket: room for a burst of
/// datagrams while the other process is busy.
const FORWARD_BUFFER: usize = 4 << 20;

/// Duplicates of the listening sockets, kept to hand over.
#[derive(Debug, Default)]
pub struct HandoverSockets {
    sockets: Vec<(OfferedSocket, OwnedFd)>,
}

impl HandoverSockets {
    /// Keeps a duplicate of `socket` for `role`.
    pub fn keep(&mut self, role: SocketRole, addr: Option<std::net::SocketAddr>, socket: &impl AsFd) {
        match socket.as_fd().try_clone_to_owned() {
            Ok(fd) => self.sockets.push((OfferedSocket { role, addr }, fd)),
            Err(e) => tracing::warn!(?role, error = %e, "cannot keep a socket to hand over; an upgrade binds it anew"),
        }
    }
}

/// What an upgrade works on; one per running server.
#[derive(Debug)]
pub struct Upgrader {
    /// The server's shared state.
    pub shared: Arc<Shared>,
    /// The sockets to hand over (released at shutdown, so that a stopping
    /// server's listeners really close).
    pub sockets: std::sync::Mutex<HandoverSockets>,
    /// The QUIC socket, shared with the successor during the handover.
    pub quic: Arc<SharedQuicSocket>,
    /// The QUIC endpoint.
    pub endpoint: quinn::Endpoint,
    /// Its server config (taken away while agents move, restored on failure).
    pub server_config: quinn::ServerConfig,
    /// How to start a successor; `None` when embedded.
    pub successor: Option<Successor>,
    /// Cancelled to retire this process (it drains, then exits).
    pub shutdown: CancellationToken,
    /// Open client connections.
    pub clients: TaskTracker,
    /// The jobs that write what one process of this server owns (status,
    /// the server's row, leases); waited for when retiring.
    pub owner_jobs: TaskTracker,
    /// Whether an upgrade is running.
    pub busy: AtomicBool,
    /// The handover stream to the successor that took over.
    pub successor_link: std::sync::Mutex<Option<UnixStream>>,
}

/// Clears the busy flag however an upgrade ends.
struct Running<'a>(&'a AtomicBool);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Sends a progress line (and logs it).
async fn progress(events: &mpsc::Sender<ControlEvent>, message: String) {
    tracing::info!(%message, "upgrade");
    let _ = events.send(ControlEvent::Progress { message }).await;
}

/// The next message from the successor, or why there is none.
async fn next(
    stream: &UnixStream,
    child: &mut tokio::process::Child,
    deadline: Duration,
    step: &'static str,
) -> Result<HandoverMessage, UpgradeError> {
    tokio::select! {
        status = child.wait() => Err(UpgradeError::SuccessorExited(
            status.map_or_else(|e| e.to_string(), |s| s.to_string()))),
        message = tokio::time::timeout(deadline, fds::recv_plain(stream)) => match message {
            Err(_) => Err(UpgradeError::Timeout(step)),
            Ok(Err(e)) => Err(e),
            Ok(Ok(HandoverMessage::Failed { error })) => Err(UpgradeError::Refused(error)),
            Ok(Ok(message)) => Ok(message),
        },
    }
}

impl Upgrader {
    /// Runs one upgrade; returns the successor's pid once it serves and
    /// this process retired.
    pub async fn upgrade(
        &self,
        binary: Option<PathBuf>,
        events: &mpsc::Sender<ControlEvent>,
    ) -> Result<u32, UpgradeError> {
        let Some(successor) = &self.successor else { return Err(UpgradeError::Unavailable) };
        if self.shared.retiring.load(Ordering::Relaxed) {
            return Err(UpgradeError::Busy("this process already handed over to a successor"));
        }
        if self.quic.has_peer() {
            return Err(UpgradeError::Busy(
                "the previous upgrade's old process is still draining; upgrade again once it exited",
            ));
        }
        if self.busy.swap(true, Ordering::AcqRel) {
            return Err(UpgradeError::Busy("an upgrade is already running"));
        }
        let _running = Running(&self.busy);
        let program = binary.unwrap_or_else(|| successor.program.clone());
        let data_dir = &self.shared.config.data_dir;
        let path = data_dir.join(format!("handover-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("binding {}: {e}", path.display())))?;
        progress(events, format!("starting {}", program.display())).await;
        let spawned = tokio::process::Command::new(&program)
            .args(&successor.args)
            .env(HANDOVER_ENV, &path)
            .stdin(std::process::Stdio::null())
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(source) => {
                let _ = std::fs::remove_file(&path);
                return Err(UpgradeError::Spawn { program, source });
            }
        };
        let result = self.hand_over(&listener, &path, &mut child, events).await;
        let _ = std::fs::remove_file(&path);
        match result {
            Ok(pid) => Ok(pid),
            Err(e) => {
                // First stop the successor (it reads the QUIC socket too),
                // then take everything back.
                if matches!(child.try_wait(), Ok(None)) {
                    tracing::warn!(pid = child.id(), "stopping the successor that could not take over");
                    let _ = child.start_kill();
                    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
                }
                self.undo();
                Err(e)
            }
        }
    }

    /// Closes the kept duplicates: once this process stops, its listeners
    /// must close (new connections are refused, not left in a backlog
    /// nobody reads).
    pub fn release_sockets(&self) {
        self.sockets.lock().unwrap_or_else(|p| p.into_inner()).sockets.clear();
    }

    /// Accepts agents again, stops sharing the QUIC socket, and names this
    /// process in the pid file again (the successor wrote its own).
    fn undo(&self) {
        self.quic.set_peer(None);
        self.quic.set_reading(true);
        self.quic.set_accepting(true);
        self.endpoint.set_server_config(Some(self.server_config.clone()));
        self.shared.handing_over.store(false, Ordering::Release);
        let pid_file = self.shared.config.data_dir.join("edge-server.pid");
        if let Err(e) = std::fs::write(&pid_file, format!("{}\n", std::process::id())) {
            tracing::warn!(path = %pid_file.display(), error = %e, "cannot restore the pid file");
        }
    }

    async fn hand_over(
        &self,
        listener: &UnixListener,
        path: &std::path::Path,
        child: &mut tokio::process::Child,
        events: &mpsc::Sender<ControlEvent>,
    ) -> Result<u32, UpgradeError> {
        let child_pid = child.id().unwrap_or(0);
        let stream = tokio::select! {
            status = child.wait() => return Err(UpgradeError::SuccessorExited(
                status.map_or_else(|e| e.to_string(), |s| s.to_string()))),
            accepted = tokio::time::timeout(CONNECT_DEADLINE, listener.accept()) => match accepted {
                Err(_) => return Err(UpgradeError::Timeout("connect to the handover socket")),
                Ok(accepted) => accepted?.0,
            },
        };
        let _ = std::fs::remove_file(path);
        // Only the process we started gets the sockets.
        let peer = rustix::net::sockopt::socket_peercred(&stream).map_err(std::io::Error::from)?;
        if peer.pid.as_raw_nonzero().get() as u32 != child_pid {
            return Err(UpgradeError::Protocol(format!(
                "pid {} connected to the handover socket, not the successor {child_pid}",
                peer.pid.as_raw_nonzero()
            )));
        }

        let (mine, theirs) = std::os::unix::net::UnixDatagram::pair()?;
        for end in [&mine, &theirs] {
            let sock = socket2::SockRef::from(end);
            let _ = sock.set_send_buffer_size(FORWARD_BUFFER);
            let _ = sock.set_recv_buffer_size(FORWARD_BUFFER);
        }
        mine.set_nonblocking(true)?;
        let kept: Vec<(OfferedSocket, OwnedFd)> = {
            let sockets = self.sockets.lock().unwrap_or_else(|p| p.into_inner());
            sockets.sockets.iter().filter_map(|(o, fd)| Some((o.clone(), fd.try_clone().ok()?))).collect()
        };
        let mut offered: Vec<OfferedSocket> = kept.iter().map(|(o, _)| o.clone()).collect();
        offered.push(OfferedSocket { role: SocketRole::QuicForward, addr: None });
        let mut descriptors: Vec<_> = kept.iter().map(|(_, fd)| fd.as_fd()).collect();
        descriptors.push(theirs.as_fd());
        let offer = HandoverMessage::Offer {
            version: HANDOVER_VERSION,
            epoch: 1 - self.quic.epoch(),
            predecessor_pid: std::process::id(),
            sockets: offered,
        };
        fds::send(&stream, &offer, &descriptors).await?;
        drop(theirs);
        self.quic.set_peer(Some(tokio::net::UnixDatagram::from_std(mine)?));
        progress(events, format!("successor pid {child_pid} has the sockets; waiting for it to serve")).await;

        match next(&stream, child, READY_DEADLINE, "start serving").await? {
            HandoverMessage::Ready { .. } => {}
            other => return Err(UpgradeError::Protocol(format!("expected ready, got {other:?}"))),
        }
        // New agent connections go to the successor from now on (it
        // accepts them already: for a moment both do, which is harmless).
        self.quic.set_accepting(false);
        self.endpoint.set_server_config(None);
        let nodes: Vec<String> =
            self.shared.registry.nodes().iter().filter(|n| n.tunnel_count() > 0).map(|n| n.name.clone()).collect();
        self.shared.handing_over.store(true, Ordering::Release);
        self.shared.agent_handover.send_modify(|generation| *generation += 1);
        fds::send(&stream, &HandoverMessage::AgentsMoving { nodes: nodes.clone() }, &[]).await?;
        progress(events, format!("successor serves; {} connected nodes asked to connect to it", nodes.len())).await;

        let missing = match next(&stream, child, TAKE_DEADLINE, "take the clients").await? {
            HandoverMessage::TakeClients { missing } => missing,
            other => return Err(UpgradeError::Protocol(format!("expected take_clients, got {other:?}"))),
        };
        if !missing.is_empty() {
            let shown: Vec<String> =
                missing.iter().take(10).map(|n| edge_net::logging::Untrusted(n).to_string()).collect();
            progress(
                events,
                format!(
                    "{} nodes had no tunnel to the successor yet (older agents reconnect after the drain): {}",
                    missing.len(),
                    shown.join(", ")
                ),
            )
            .await;
        }
        // The successor accepts clients: no way back from here. Retire: the
        // successor reads the QUIC socket and passes this process its
        // connections' datagrams; the jobs that write what the successor
        // now owns stop before it starts its own.
        self.shared.retiring.store(true, Ordering::Release);
        self.quic.set_reading(false);
        self.shutdown.cancel();
        self.owner_jobs.close();
        if tokio::time::timeout(Duration::from_secs(3), self.owner_jobs.wait()).await.is_err() {
            tracing::warn!("background jobs did not stop within 3 s; the successor starts its own anyway");
        }
        let open_connections = self.clients.len() as u64;
        if let Err(e) = fds::send(&stream, &HandoverMessage::Retired { open_connections }, &[]).await {
            tracing::warn!(error = %e, "could not tell the successor this process retired");
        }
        progress(
            events,
            format!(
                "successor pid {child_pid} accepts clients; this process (pid {}) drains {open_connections} \
                 connections, then exits",
                std::process::id()
            ),
        )
        .await;
        // The successor watches this stream to learn when this process is
        // gone: it stays open until exit.
        *self.successor_link.lock().unwrap_or_else(|p| p.into_inner()) = Some(stream);
        Ok(child_pid)
    }
}
