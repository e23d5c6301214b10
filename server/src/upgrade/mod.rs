//! Zero-downtime upgrade of a single server: a successor process (the
//! binary now on disk, or another) takes over the running one's sockets
//! and the old process drains and exits. No listening socket is ever
//! closed, so no client connection is refused.
//!
//! `edge-server upgrade` asks the running server over its control socket
//! ([`control`]). The running server (the predecessor, [`predecessor`])
//! then:
//! 1. starts the successor with `EDGE_SERVER_HANDOVER` naming a one-time
//!    Unix socket, and passes it every listening socket as a descriptor
//!    ([`fds`]) with the QUIC epoch it is to use;
//! 2. when the successor says `ready` (its store open, its QUIC endpoint,
//!    API and DNS serving), stops accepting agents and tells its agents to
//!    connect again: their new connections reach the successor, their open
//!    streams stay on the old connections;
//! 3. when the successor holds tunnels to those nodes (or waited long
//!    enough) and starts accepting clients, stops accepting anything and its
//!    background jobs, drains its open connections and exits.
//!
//! Both processes read the one QUIC socket meanwhile; each passes the other
//! the datagrams of its connections (`edge_net::shared_quic`). The
//! successor ([`successor`]) tells systemd it is the main process now
//! ([`systemd`]).

pub mod control;
pub mod fds;
pub mod predecessor;
pub mod successor;
pub mod systemd;

use std::ffi::OsString;
use std::path::{Path, PathBuf};

pub use predecessor::{HandoverSockets, Upgrader};
pub use successor::Takeover;

/// Environment variable naming the handover socket a successor connects to.
pub const HANDOVER_ENV: &str = "EDGE_SERVER_HANDOVER";

/// Where a running server listens for `edge-server upgrade`.
pub fn control_socket(data_dir: &Path) -> PathBuf {
    data_dir.join("edge-server.sock")
}

/// How to start a successor: the program and the arguments the running
/// server was started with.
#[derive(Debug, Clone)]
pub struct Successor {
    /// The executable (resolved when the server started, so that it names
    /// the path a package upgrade replaces, not the replaced file).
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<OsString>,
}

/// Why an upgrade could not be done. The running server keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// This server cannot start a successor (embedded in another program).
    #[error("this server was not started by the edge-server binary; it cannot start a successor")]
    Unavailable,
    /// An upgrade already runs, or this process already handed over.
    #[error("{0}")]
    Busy(&'static str),
    /// The successor could not be started.
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// The executable.
        program: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The successor exited before it took over.
    #[error("the successor exited before it took over ({0}); its log says why")]
    SuccessorExited(String),
    /// A step took too long.
    #[error("the successor did not {0} in time")]
    Timeout(&'static str),
    /// The other side said it cannot go on.
    #[error("the other process refused: {0}")]
    Refused(String),
    /// The other side sent something out of order, or its version differs.
    #[error("handover protocol: {0}")]
    Protocol(String),
    /// A handover message was malformed.
    #[error(transparent)]
    Format(#[from] edge_proto::handover::HandoverError),
    /// A socket operation failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}
