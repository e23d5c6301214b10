//! Fault injection for the fault tests: a UDP relay that can black-hole a
//! QUIC path, processes started in their own mount namespace (tmpfs or
//! read-only data directories), and timestamps from JSON logs.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::{bin, wait_for, Agent, Proc};

/// A UDP relay in front of one target (a server's QUIC port). Each client
/// source address gets its own upstream socket, so several agents, and an
/// agent that comes back from a new port, all work. While paused, every
/// datagram is dropped, both ways; datagrams above a set size are dropped
/// too, as a path with a small MTU would. [`UdpRelay::rebind`] moves every
/// client to a new upstream socket on another address, as a NAT that
/// rebinds does.
#[derive(Debug)]
pub struct UdpRelay {
    /// Where clients send.
    pub addr: SocketAddr,
    state: Arc<RelayState>,
}

#[derive(Debug, Default)]
struct RelayState {
    paused: AtomicBool,
    stop: AtomicBool,
    /// Largest datagram passed; 0 for no limit.
    max_datagram: AtomicUsize,
    clients: AtomicU64,
    dropped: AtomicU64,
    oversized: AtomicU64,
    /// Bumped by [`UdpRelay::rebind`]; upstream sockets of older epochs
    /// are replaced at the client's next datagram.
    epoch: AtomicU64,
    /// Address new upstream sockets bind (127.0.0.1 until rebound).
    source_ip: std::sync::Mutex<Option<std::net::IpAddr>>,
}

impl RelayState {
    /// Whether a datagram of `len` bytes passes; counts the ones that do not.
    fn passes(&self, len: usize) -> bool {
        if self.paused.load(Ordering::SeqCst) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let max = self.max_datagram.load(Ordering::Relaxed);
        if max > 0 && len > max {
            self.oversized.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        true
    }
}

impl UdpRelay {
    /// Starts relaying `127.0.0.1:<any>` to `target`, unpaused.
    pub fn start(target: SocketAddr) -> Result<Self> {
        let front = UdpSocket::bind("127.0.0.1:0")?;
        front.set_read_timeout(Some(Duration::from_millis(100)))?;
        let addr = front.local_addr()?;
        let state = Arc::new(RelayState::default());
        let relay = Self { addr, state: state.clone() };
        std::thread::spawn(move || {
            let mut map: HashMap<SocketAddr, Upstream> = HashMap::new();
            let mut buf = vec![0u8; 65536];
            while !state.stop.load(Ordering::SeqCst) {
                let Ok((n, src)) = front.recv_from(&mut buf) else { continue };
                if !state.passes(n) {
                    continue;
                }
                let epoch = state.epoch.load(Ordering::SeqCst);
                if map.get(&src).is_some_and(|u| u.epoch != epoch) {
                    if let Some(old) = map.remove(&src) {
                        old.retired.store(true, Ordering::SeqCst);
                    }
                }
                let up = match map.entry(src) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        let Ok(up) = Self::upstream(target, src, &front, &state, epoch) else { continue };
                        state.clients.fetch_add(1, Ordering::SeqCst);
                        e.insert(up)
                    }
                };
                let _ = up.socket.send(&buf[..n]);
            }
        });
        Ok(relay)
    }

    /// A socket connected to `target` for client `src`, and the thread
    /// carrying its answers back until the socket is retired.
    fn upstream(
        target: SocketAddr,
        src: SocketAddr,
        front: &UdpSocket,
        state: &Arc<RelayState>,
        epoch: u64,
    ) -> Result<Upstream> {
        let ip = state.source_ip.lock().unwrap().unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]));
        let up = UdpSocket::bind(SocketAddr::new(ip, 0))?;
        up.connect(target)?;
        up.set_read_timeout(Some(Duration::from_millis(100)))?;
        let retired = Arc::new(AtomicBool::new(false));
        let (back, front, state, done) = (up.try_clone()?, front.try_clone()?, state.clone(), retired.clone());
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !state.stop.load(Ordering::SeqCst) && !done.load(Ordering::SeqCst) {
                // Errors (ICMP refusals while the target is down) are not fatal.
                let Ok(n) = back.recv(&mut buf) else { continue };
                if state.passes(n) {
                    let _ = front.send_to(&buf[..n], src);
                }
            }
        });
        Ok(Upstream { socket: up, epoch, retired })
    }

    /// From now on, every client's datagrams leave from a new socket on
    /// `ip` (a NAT rebinding): the target sees the same peer at a new
    /// address and port, and the old socket stops carrying answers.
    pub fn rebind(&self, ip: std::net::IpAddr) {
        *self.state.source_ip.lock().unwrap() = Some(ip);
        self.state.epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// Drops everything while `paused`.
    pub fn set_paused(&self, paused: bool) {
        self.state.paused.store(paused, Ordering::SeqCst);
    }

    /// Drops datagrams larger than `bytes` both ways (0: no limit), like a
    /// path whose MTU is `bytes` plus the IP and UDP headers.
    pub fn set_max_datagram(&self, bytes: usize) {
        self.state.max_datagram.store(bytes, Ordering::SeqCst);
    }

    /// Client source addresses seen so far.
    pub fn clients(&self) -> u64 {
        self.state.clients.load(Ordering::SeqCst)
    }

    /// Datagrams dropped while paused.
    pub fn dropped(&self) -> u64 {
        self.state.dropped.load(Ordering::Relaxed)
    }

    /// Datagrams dropped for being larger than the set maximum.
    pub fn oversized(&self) -> u64 {
        self.state.oversized.load(Ordering::Relaxed)
    }
}

/// One client's socket toward the target.
#[derive(Debug)]
struct Upstream {
    socket: UdpSocket,
    epoch: u64,
    retired: Arc<AtomicBool>,
}

impl Drop for UdpRelay {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
    }
}

/// Starts `program args` with stderr to `log` (RUST_LOG as the harness sets
/// it), killed when the returned [`Proc`] drops.
pub fn spawn_logged(mut cmd: Command, log: PathBuf) -> Result<Proc> {
    let file = std::fs::File::create(&log)?;
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(file);
    cmd.env("RUST_LOG", std::env::var("EDGE_TEST_LOG").unwrap_or_else(|_| "info".into()));
    let child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
    Ok(Proc { child, log })
}

/// `program args` in a new mount namespace after the shell command `setup`
/// (e.g. a tmpfs mount) succeeded. The process keeps the child's pid
/// (`unshare` and `sh` exec), so `/proc/<pid>/root/...` sees its mounts.
pub fn in_namespace(setup: &str, program: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new("unshare");
    cmd.args(["-m", "sh", "-c", &format!("{setup} && exec \"$0\" \"$@\"")]).arg(program).args(args);
    cmd
}

/// Runs a command until it exits or `limit` passes: (exit code if it
/// exited, stderr so far). A process still running is killed.
pub fn run_bounded(cmd: Command, log: PathBuf, limit: Duration) -> Result<(Option<i32>, String)> {
    let mut proc = spawn_logged(cmd, log)?;
    let status = proc.wait_exit(limit);
    Ok((status.map(|s| s.code().unwrap_or(-1)), proc.log_text()))
}

/// Starts `edge-agent run` with `data_dir` as a fresh tmpfs of `size` in
/// its own mount namespace. The config (`join`, `upstream`, `extra`) and the
/// log stay in `dir`. The returned agent's `data_dir` is the tmpfs as seen
/// through `/proc/<pid>/root`.
pub fn agent_on_tmpfs(dir: &Path, size: &str, join: &str, upstream: SocketAddr, extra: &str) -> Result<Agent> {
    let data = dir.join("data");
    std::fs::create_dir_all(&data)?;
    let config = dir.join("agent.toml");
    std::fs::write(&config, format!("join = {join:?}\nupstream = \"{upstream}\"\n{extra}\n"))?;
    let (data_s, config_s) = (data.to_string_lossy().into_owned(), config.to_string_lossy().into_owned());
    let setup = format!("mount -t tmpfs -o size={size} tmpfs '{data_s}'");
    let args = ["run", "--config", &config_s, "--status-listen", "127.0.0.1:0", "--data-dir", &data_s];
    let mut proc = spawn_logged(in_namespace(&setup, &bin("edge-agent"), &args), dir.join("agent.log"))?;
    let seen = PathBuf::from(format!("/proc/{}/root{data_s}", proc.child.id()));
    let status = wait_for("agent status.addr on tmpfs", Duration::from_secs(20), || {
        if !proc.alive() {
            return Some(None);
        }
        std::fs::read_to_string(seen.join("status.addr")).ok()?.trim().parse().ok().map(Some)
    })?
    .with_context(|| format!("agent exited at start:\n{}", proc.log_text()))?;
    Ok(Agent { proc, data_dir: seen, status })
}

/// Unix time in seconds of an RFC 3339 UTC timestamp
/// (`2025-01-02T03:04:05.678901Z`, as tracing's JSON logs write them).
pub fn rfc3339_secs(ts: &str) -> Option<f64> {
    let (date, time) = ts.trim_end_matches('Z').split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let (h, min, s) = (t.next()?.parse::<f64>().ok()?, t.next()?.parse::<f64>().ok()?, t.next()?.parse::<f64>().ok()?);
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    Some(days as f64 * 86_400.0 + h * 3600.0 + min * 60.0 + s)
}

/// JSON log lines whose message is `message`: (unix seconds, fields).
pub fn json_events(log: &str, message: &str) -> Vec<(f64, serde_json::Value)> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == message)
        .filter_map(|v| Some((rfc3339_secs(v["timestamp"].as_str()?)?, v["fields"].clone())))
        .collect()
}

/// The largest number of `times` (sorted) inside any window of `width`.
pub fn busiest_window(times: &[f64], width: f64) -> usize {
    let mut best = 0;
    let mut start = 0;
    for end in 0..times.len() {
        while times[end] - times[start] >= width {
            start += 1;
        }
        best = best.max(end - start + 1);
    }
    best
}

/// A TCP relay that can stop forwarding without closing anything: a peer
/// that hangs (a partition behind a proxy, a stuck server). The kernel keeps
/// acknowledging what is sent, so only the sender's own deadlines notice.
#[derive(Debug)]
pub struct TcpRelay {
    /// Where clients connect.
    pub addr: SocketAddr,
    paused: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl TcpRelay {
    /// Relays every connection on a new loopback port to `target`.
    pub fn start(target: SocketAddr) -> Result<Self> {
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let paused = std::sync::Arc::new(AtomicBool::new(false));
        let flag = paused.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = std::net::TcpStream::connect(target) else { continue };
                for (mut from, mut to) in
                    [(client.try_clone(), server.try_clone()), (server.try_clone(), client.try_clone())]
                        .into_iter()
                        .filter_map(|(a, b)| Some((a.ok()?, b.ok()?)))
                {
                    let flag = flag.clone();
                    std::thread::spawn(move || {
                        use std::io::{Read, Write};
                        let mut buf = [0u8; 16 * 1024];
                        loop {
                            let n = match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            // Hold the bytes while paused (bounded: the test
                            // that pauses also resumes, or the process ends).
                            while flag.load(Ordering::Relaxed) {
                                std::thread::sleep(Duration::from_millis(10));
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        Ok(Self { addr, paused })
    }

    /// Stops (`true`) or resumes forwarding on every connection.
    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, std::sync::atomic::Ordering::Relaxed);
    }
}
