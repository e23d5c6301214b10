//! `edge-bench-upstream`: the bench upstream's protocol
//! (`upstreams::bench_protocol`) behind TLS 1.3 with the certificate given,
//! in a process of its own. `edge-passthrough-bench` reaches it directly,
//! through the tunnel in passthrough mode, and through HAProxy.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;

/// A TLS backend for the passthrough benchmark.
#[derive(Debug, Parser)]
struct Args {
    /// Certificate chain (PEM).
    #[arg(long)]
    cert: PathBuf,
    /// Private key (PEM).
    #[arg(long)]
    key: PathBuf,
    /// Where to write the bound address.
    #[arg(long)]
    addr_file: PathBuf,
    /// Runtime worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    edge_net::raise_fd_limit();
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(args.threads.max(1)).enable_all().build()?;
    runtime.block_on(serve(args))
}

async fn serve(args: Args) -> Result<()> {
    let key = edge_certs::pem::load_certified_key(&args.cert, &args.key)?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(key)));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    std::fs::write(&args.addr_file, addr.to_string()).context("writing the address file")?;
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            if let Ok(tls) = acceptor.accept(tcp).await {
                edge_tests::upstreams::bench_protocol(tls).await;
            }
        });
    }
}
