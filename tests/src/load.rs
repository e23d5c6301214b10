//! Client load for the benchmarks: TLS connections to a target running the
//! bench upstream's protocol (`upstreams::bench_protocol`), timed.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::clients;

/// Where a load goes: an address, the SNI, and the client's trust.
#[derive(Debug, Clone)]
pub struct Target {
    /// Address to connect to.
    pub addr: SocketAddr,
    /// Server name sent.
    pub sni: String,
    /// Client config.
    pub tls: Arc<rustls::ClientConfig>,
}

/// A `[tunnel]` section for both ends: `max_udp_payload` when given, then
/// each `KEY = VALUE` line of `settings`.
pub fn tunnel_config(max_udp_payload: Option<u16>, settings: &[String]) -> String {
    let mut config = String::from("[tunnel]\n");
    if let Some(n) = max_udp_payload {
        config.push_str(&format!("max_udp_payload = {n}\n"));
    }
    for setting in settings {
        config.push_str(setting);
        config.push('\n');
    }
    config
}

/// The median of `values` (the upper one for an even count).
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// A TLS connection to `t`.
pub async fn connect(t: &Target) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    clients::connect(t.addr, &t.sni, t.tls.clone()).await
}

/// Downloads `bytes` over one connection.
pub async fn blast(t: &Target, bytes: usize) -> Result<()> {
    let mut tls = connect(t).await?;
    tls.write_all(format!("BLAST {bytes}\n").as_bytes()).await?;
    let got = read_to_end_counting(&mut tls).await?;
    anyhow::ensure!(got == bytes, "got {got} of {bytes} bytes");
    Ok(())
}

/// Reads `r` to EOF, discarding the bytes, and returns how many there were.
pub async fn read_to_end_counting<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> std::io::Result<usize> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    loop {
        match r.read(&mut buf).await? {
            0 => return Ok(got),
            n => got += n,
        }
    }
}

/// MB/s of `connections` concurrent downloads of `bytes` each.
pub async fn throughput(t: &Target, connections: usize, bytes: usize) -> Result<f64> {
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let t = t.clone();
        tasks.spawn(async move { blast(&t, bytes).await });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok((connections * bytes) as f64 / start.elapsed().as_secs_f64() / 1e6)
}

/// A new connection and one request on it.
pub async fn handshake_request(t: &Target) -> Result<()> {
    let mut tls = connect(t).await?;
    tls.write_all(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n").await?;
    read_response(&mut tls).await?;
    Ok(())
}

/// Reads one `Content-Length: 2` response (the bench upstream's).
pub async fn read_response<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Result<()> {
    let mut buf = Vec::with_capacity(128);
    let mut chunk = [0u8; 128];
    loop {
        let n = s.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "closed mid-response");
        buf.extend_from_slice(&chunk[..n]);
        if buf.ends_with(b"\r\n\r\nok") {
            return Ok(());
        }
    }
}

/// New connections (each with one request) per second, `workers` at once.
pub async fn conns_per_sec(t: &Target, workers: usize, length: Duration) -> Result<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + length;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let t = t.clone();
        let (done, failed) = (done.clone(), failed.clone());
        tasks.spawn(async move {
            while Instant::now() < deadline {
                match handshake_request(&t).await {
                    Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    anyhow::ensure!(failed.load(Ordering::Relaxed) == 0, "{} connections failed", failed.load(Ordering::Relaxed));
    Ok(done.load(Ordering::Relaxed) as f64 / length.as_secs_f64())
}

/// Keep-alive requests on `workers` connections for `length`: p50, p99
/// and p99.9 in µs, and how many requests were served.
pub async fn latency(t: &Target, workers: usize, length: Duration) -> Result<(f64, f64, f64, usize)> {
    let deadline = Instant::now() + length;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let t = t.clone();
        tasks.spawn(async move {
            let mut tls = connect(&t).await?;
            let mut samples = Vec::new();
            while Instant::now() < deadline {
                let start = Instant::now();
                tls.write_all(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n").await?;
                read_response(&mut tls).await?;
                samples.push(start.elapsed().as_micros() as u64);
            }
            Ok::<_, anyhow::Error>(samples)
        });
    }
    let mut all = Vec::new();
    while let Some(r) = tasks.join_next().await {
        all.extend(r??);
    }
    all.sort_unstable();
    let q = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1))).copied().unwrap_or(0) as f64
    };
    Ok((q(0.50), q(0.99), q(0.999), all.len()))
}
