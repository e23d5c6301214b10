//! The systemd readiness protocol (`sd_notify`): `READY=1` once the server
//! serves, and `MAINPID=` when a successor takes over, so that systemd
//! follows the new process instead of stopping the service when the old
//! one exits (the unit has `Type=notify` and `NotifyAccess=all`). Outside
//! systemd (`NOTIFY_SOCKET` unset) nothing is sent.

use std::os::unix::net::UnixDatagram;

/// Sends `state` (newline-separated `KEY=value` lines) to systemd; whether
/// it was sent.
pub fn notify(state: &str) -> bool {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return false };
    send_to(&path, state)
}

/// Sends `state` to the notification socket `path` (a file, or `@name`
/// for an abstract socket).
fn send_to(path: &std::ffi::OsStr, state: &str) -> bool {
    let Ok(socket) = UnixDatagram::unbound() else { return false };
    let bytes = path.as_encoded_bytes();
    let sent = match bytes.strip_prefix(b"@") {
        // An abstract socket name.
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name)
                .and_then(|addr| socket.send_to_addr(state.as_bytes(), &addr))
        }
        None => socket.send_to(state.as_bytes(), path),
    };
    match sent {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(error = %e, "could not notify systemd");
            false
        }
    }
}

/// Tells systemd the server serves.
pub fn ready() {
    notify("READY=1\nSTATUS=serving");
}

/// Tells systemd this process is now the service's main process.
pub fn main_pid_is_me() {
    notify(&format!("MAINPID={}\nREADY=1\nSTATUS=serving (took over by upgrade)", std::process::id()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_reach_a_path_socket_and_an_abstract_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        assert!(send_to(path.as_os_str(), "READY=1"));
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("edge-test-notify-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let abstract_listener = UnixDatagram::bind_addr(&addr).unwrap();
        assert!(send_to(std::ffi::OsStr::new(&format!("@{name}")), "MAINPID=7"));
        let n = abstract_listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"MAINPID=7");
        // Nobody listening: reported, not a panic.
        assert!(!send_to(dir.path().join("absent").as_os_str(), "READY=1"));
    }

    #[test]
    fn without_systemd_nothing_is_sent() {
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            assert!(!super::notify("READY=1"));
        }
    }
}
