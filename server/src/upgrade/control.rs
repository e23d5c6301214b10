//! The control socket `<data_dir>/edge-server.sock`: `edge-server upgrade`
//! sends one [`ControlRequest`] line and reads [`ControlEvent`] lines until
//! `done` or `failed`. Only the server's own user may use it (the socket is
//! mode 0600 and the peer's uid is checked).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use edge_proto::handover::{self, ControlEvent, ControlRequest, MAX_CONTROL_LINE};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{UpgradeError, Upgrader};

/// How long a client may take to send its request.
const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// How long `edge-server upgrade` waits for the whole upgrade.
pub const CLIENT_DEADLINE: Duration = Duration::from_secs(180);

/// Binds the control socket at `path`, removing a stale one. A socket a
/// live server answers on is left alone (`None`: another server uses this
/// data directory).
pub fn bind(path: &Path) -> std::io::Result<Option<std::os::unix::net::UnixListener>> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Ok(None);
    }
    let _ = std::fs::remove_file(path);
    let listener = std::os::unix::net::UnixListener::bind(path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(Some(listener))
}

/// Serves control requests until `shutdown`.
pub async fn serve(listener: UnixListener, upgrader: Arc<Upgrader>, shutdown: CancellationToken) {
    // An upgrade's last lines are written after this process began to
    // drain: handlers get a moment to finish before the process may exit.
    let handlers = tokio_util::task::TaskTracker::new();
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => {
                handlers.close();
                let _ = tokio::time::timeout(Duration::from_secs(2), handlers.wait()).await;
                return;
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        handlers.spawn(handle(stream, upgrader.clone()));
    }
}

async fn write_event(stream: &mut UnixStream, event: &ControlEvent) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(event).unwrap_or_default();
    line.push(b'\n');
    stream.write_all(&line).await
}

async fn handle(mut stream: UnixStream, upgrader: Arc<Upgrader>) {
    let same_user = rustix::net::sockopt::socket_peercred(&stream)
        .is_ok_and(|peer| peer.uid == rustix::process::getuid() || peer.uid.is_root());
    if !same_user {
        let error = "only the server's user may use the control socket".to_string();
        let _ = write_event(&mut stream, &ControlEvent::Failed { error }).await;
        return;
    }
    let mut line = Vec::new();
    let read = {
        let mut reader = BufReader::new((&mut stream).take(MAX_CONTROL_LINE as u64 + 1));
        tokio::time::timeout(REQUEST_DEADLINE, reader.read_until(b'\n', &mut line)).await
    };
    if !matches!(read, Ok(Ok(_))) {
        return;
    }
    let request: ControlRequest = match handover::parse_control_line(line.trim_ascii_end()) {
        Ok(request) => request,
        Err(e) => {
            let _ = write_event(&mut stream, &ControlEvent::Failed { error: format!("bad request: {e}") }).await;
            return;
        }
    };
    match request {
        ControlRequest::Upgrade { binary } => {
            let (events, mut lines) = mpsc::channel(16);
            let work = {
                let upgrader = upgrader.clone();
                async move {
                    let result = upgrader.upgrade(binary.map(Into::into), &events).await;
                    let last = match result {
                        Ok(pid) => ControlEvent::Done { pid },
                        Err(e) => {
                            tracing::error!(error = %e, "upgrade failed; this process keeps serving");
                            ControlEvent::Failed { error: e.to_string() }
                        }
                    };
                    let _ = events.send(last).await;
                }
            };
            let work = tokio::spawn(work);
            while let Some(event) = lines.recv().await {
                if write_event(&mut stream, &event).await.is_err() {
                    // The operator went away; the upgrade goes on.
                    break;
                }
            }
            let _ = work.await;
        }
    }
}

/// `edge-server upgrade`: asks the server on `path` to upgrade and calls
/// `on_event` for each line; returns the successor's pid.
pub async fn request_upgrade(
    path: &Path,
    binary: Option<String>,
    mut on_event: impl FnMut(&ControlEvent),
) -> Result<u32, UpgradeError> {
    let mut stream = UnixStream::connect(path).await?;
    let mut request = serde_json::to_vec(&ControlRequest::Upgrade { binary }).unwrap_or_default();
    request.push(b'\n');
    stream.write_all(&request).await?;
    let mut reader = BufReader::new(stream);
    let work = async {
        loop {
            let mut line = Vec::new();
            let n = (&mut reader).take(MAX_CONTROL_LINE as u64 + 1).read_until(b'\n', &mut line).await?;
            if n == 0 {
                return Err(UpgradeError::Protocol("the server closed the control socket without an answer".into()));
            }
            let event: ControlEvent = handover::parse_control_line(line.trim_ascii_end())?;
            on_event(&event);
            match event {
                ControlEvent::Done { pid } => return Ok(pid),
                ControlEvent::Failed { error } => return Err(UpgradeError::Refused(error)),
                ControlEvent::Progress { .. } => {}
            }
        }
    };
    tokio::time::timeout(CLIENT_DEADLINE, work).await.map_err(|_| UpgradeError::Timeout("finish the upgrade"))?
}
