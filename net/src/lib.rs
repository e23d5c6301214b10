//! Runtime glue shared by `edge-server` and `edge-agent`.
//!
//! The protocol logic lives in `edge-proto` (sans-IO); this crate holds the
//! few pieces both binaries need to move bytes with tokio and quinn:
//!
//! - [`quic`]: transport tuning for a busy tunnel and UDP sockets with large
//!   buffers.
//! - [`splice`]: TCP ⇄ QUIC stream copy with half-close and reset propagation.
//! - [`stall`]: shedding streams whose reader stopped reading before they
//!   hold a whole tunnel's flow-control window.
//! - [`pinned`]: a rustls verifier that accepts exactly one certificate,
//!   identified by its SHA-256 fingerprint.
//! - [`https`]: one JSON request over HTTPS with a bearer token.
//! - [`logging`]: tracing subscriber setup (text or JSON), escaping and
//!   throttling of what peers can make us log.
//! - [`shared_quic`]: a QUIC UDP socket two server processes share during an
//!   upgrade, passing each other the datagrams of their connections.
//! - [`write_deadline`]: writes that must make progress within a deadline.
//! - [`runtime`]: the tokio runtime, sized by `[runtime] threads`.
//! - [`lean_copy`]: a bidirectional copy that holds no buffer while idle.
//! - [`tunnel_udp`]: a quinn socket made of a tunnel's DATAGRAM frames, and
//!   [`frame_streams`]: the streams for frames too large for one.
#![forbid(unsafe_code)]

pub mod frame_streams;
pub mod https;
pub mod lean_copy;
pub mod logging;
pub mod pinned;
pub mod quic;
pub mod route_cids;
pub mod runtime;
pub mod shared_quic;
pub mod splice;
pub mod stall;
pub mod tunnel_udp;
pub mod write_deadline;

/// Raises the soft limit on open files to the hard limit: every client
/// connection costs a descriptor or two, and the common soft default of
/// 1024 would cap a busy server far below what it can carry.
pub fn raise_fd_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "open file limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open file limit"),
    }
}

/// Appends process gauges in Prometheus text format: open file descriptors
/// and live tokio tasks, so leaks show on a dashboard (and in tests).
pub fn render_process_metrics(out: &mut String) {
    use std::fmt::Write;
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        let _ = writeln!(out, "# HELP edge_process_open_fds File descriptors open in this process.");
        let _ = writeln!(out, "# TYPE edge_process_open_fds gauge");
        let _ = writeln!(out, "edge_process_open_fds {}", fds.count());
    }
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        let _ = writeln!(out, "# HELP edge_tasks_alive Tokio tasks alive in this process.");
        let _ = writeln!(out, "# TYPE edge_tasks_alive gauge");
        let _ = writeln!(out, "edge_tasks_alive {}", handle.metrics().num_alive_tasks());
    }
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        if let Some(kb) = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        {
            let _ = writeln!(out, "# HELP edge_process_resident_memory_bytes Resident set size.");
            let _ = writeln!(out, "# TYPE edge_process_resident_memory_bytes gauge");
            let _ = writeln!(out, "edge_process_resident_memory_bytes {}", kb * 1024);
        }
    }
}

/// An error and its causes on one line, `a: b: c`, skipping a cause whose
/// text the line already ends with (many errors print their source too).
pub fn error_chain<'a>(chain: impl Iterator<Item = &'a (dyn std::error::Error + 'static)>) -> String {
    let mut line = String::new();
    for cause in chain {
        let text = cause.to_string();
        if line.ends_with(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("reading /x/y.crt: {source}")]
    struct Outer {
        source: std::io::Error,
    }

    #[test]
    fn error_chain_skips_repeated_causes() {
        let inner = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let outer = Outer { source: inner };
        let chain = std::iter::successors(Some(&outer as &(dyn std::error::Error + 'static)), |e| e.source());
        assert_eq!(super::error_chain(chain), "reading /x/y.crt: No such file");
    }
}
