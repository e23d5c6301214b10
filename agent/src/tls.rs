//! TLS on the agent: the node certificate it terminates client TLS with
//! (swappable at run time), and how it trusts the server.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

use rustls::sign::CertifiedKey;

use crate::config::AgentConfig;
use crate::AgentError;

/// Serves whatever certificate is current: a custom domain's own when the
/// client names one that has it, else the node's. A swap affects new
/// handshakes only, connections already open keep theirs.
#[derive(Debug)]
pub struct NodeCertResolver {
    current: RwLock<Option<Arc<CertifiedKey>>>,
    domains: RwLock<HashMap<String, Arc<CertifiedKey>>>,
}

impl NodeCertResolver {
    /// An empty resolver (handshakes fail until a certificate is set).
    pub fn new() -> Arc<Self> {
        Arc::new(Self { current: RwLock::new(None), domains: RwLock::new(HashMap::new()) })
    }

    /// Installs a new certificate.
    pub fn set(&self, key: Arc<CertifiedKey>) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(key);
    }

    /// Installs (or with `None` removes) the certificate of a custom domain.
    pub fn set_domain(&self, domain: &str, key: Option<Arc<CertifiedKey>>) {
        let mut domains = self.domains.write().unwrap_or_else(|p| p.into_inner());
        match key {
            Some(key) => domains.insert(domain.to_string(), key),
            None => domains.remove(domain),
        };
    }

    /// Whether a certificate is installed.
    pub fn is_ready(&self) -> bool {
        self.current.read().unwrap_or_else(|p| p.into_inner()).is_some()
    }
}

impl rustls::server::ResolvesServerCert for NodeCertResolver {
    fn resolve(&self, hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if let Some(name) = hello.server_name() {
            let domains = self.domains.read().unwrap_or_else(|p| p.into_inner());
            if let Some(key) = domains.get(&name.to_ascii_lowercase()) {
                return Some(key.clone());
            }
        }
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// TLS-ALPN-01 answers being served, by host (RFC 8737): a connection with
/// ALPN `acme-tls/1` for such a host gets the challenge certificate and
/// nothing else.
#[derive(Debug, Default)]
pub struct ChallengeCerts {
    certs: RwLock<HashMap<String, (Arc<CertifiedKey>, std::time::Instant)>>,
}

/// How long an answer is served at most: orders take minutes, and an
/// answer whose withdrawal was lost (a session that ended, an order
/// cancelled) must not linger.
const CHALLENGE_LIFETIME: std::time::Duration = std::time::Duration::from_secs(600);

impl ChallengeCerts {
    /// Serves `key` for `host` from now on (for [`CHALLENGE_LIFETIME`] at
    /// most), or with `None` no longer.
    pub fn set(&self, host: &str, key: Option<Arc<CertifiedKey>>) {
        let mut certs = self.certs.write().unwrap_or_else(|p| p.into_inner());
        certs.retain(|_, (_, since)| since.elapsed() < CHALLENGE_LIFETIME);
        match key {
            Some(key) => certs.insert(host.to_string(), (key, std::time::Instant::now())),
            None => certs.remove(host),
        };
    }

    /// Whether no answer is served (the common case: handshakes skip the
    /// look at the ClientHello).
    pub fn is_empty(&self) -> bool {
        let certs = self.certs.read().unwrap_or_else(|p| p.into_inner());
        if certs.is_empty() {
            return true;
        }
        let stale = certs.values().all(|(_, since)| since.elapsed() >= CHALLENGE_LIFETIME);
        drop(certs);
        if stale {
            self.certs.write().unwrap_or_else(|p| p.into_inner()).clear();
        }
        stale
    }

    /// The TLS config answering `host`'s challenge, when one is served.
    pub fn config_for(&self, host: &str) -> Option<Arc<rustls::ServerConfig>> {
        let (key, since) = self.certs.read().unwrap_or_else(|p| p.into_inner()).get(host).cloned()?;
        if since.elapsed() >= CHALLENGE_LIFETIME {
            return None;
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .ok()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(key)));
        config.alpn_protocols = vec![edge_proto::domains::ACME_TLS_ALPN.to_vec()];
        Some(Arc::new(config))
    }
}

/// The TLS server config used to terminate client connections.
pub fn termination_config(resolver: Arc<NodeCertResolver>, alpn: &[String]) -> Arc<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap_or_else(|_| rustls::ServerConfig::builder_with_protocol_versions(rustls::DEFAULT_VERSIONS))
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = alpn.iter().map(|a| a.as_bytes().to_vec()).collect();
    Arc::new(config)
}

/// Loads the configured node certificate, or creates a local one for
/// `hostnames` in `<data_dir>/certs`.
pub fn load_node_cert(config: &AgentConfig, node: &str, hostnames: &[String]) -> Result<Arc<CertifiedKey>, AgentError> {
    let key = match (&config.cert_file, &config.key_file) {
        (Some(cert), Some(key)) => edge_certs::pem::load_certified_key(cert, key)?,
        _ => {
            let dir = config.data_dir.join("certs");
            let local = edge_certs::generate::local_node_cert(&dir, node, hostnames)?;
            tracing::info!(
                cert = %local.pair.cert.display(),
                ca = %local.ca.display(),
                "using a locally generated certificate; clients must trust the local CA (e.g. curl --cacert)"
            );
            edge_certs::pem::load_certified_key(&local.pair.cert, &local.pair.key)?
        }
    };
    Ok(Arc::new(key))
}

/// How the agent checks the server's certificate.
#[derive(Debug, Clone)]
pub enum ServerTrust {
    /// Exactly this certificate (SHA-256 of its DER).
    Pinned(Arc<edge_net::pinned::PinnedVerifier>),
    /// Any certificate for the server's name from this CA bundle.
    Roots(Arc<rustls::RootCertStore>),
}

impl ServerTrust {
    /// From the config: a CA file wins over the join string's fingerprint.
    pub fn from_config(ca_file: Option<&Path>, fingerprint: Option<[u8; 32]>) -> Result<Self, AgentError> {
        if let Some(path) = ca_file {
            let mut roots = rustls::RootCertStore::empty();
            for cert in edge_certs::pem::load_certs(path)? {
                roots.add(cert).map_err(|e| AgentError::Config(format!("server_ca_file {}: {e}", path.display())))?;
            }
            return Ok(ServerTrust::Roots(Arc::new(roots)));
        }
        let fp = fingerprint.ok_or_else(|| AgentError::Config("join string has no fingerprint".into()))?;
        Ok(ServerTrust::Pinned(edge_net::pinned::PinnedVerifier::new(fp)))
    }

    /// A client config with this trust and the given ALPN.
    pub fn client_config(&self, alpn: &[u8]) -> Arc<rustls::ClientConfig> {
        let builder = edge_net::https::tls13_client_builder();
        let mut config = match self {
            ServerTrust::Pinned(verifier) => {
                builder.dangerous().with_custom_certificate_verifier(verifier.clone()).with_no_client_auth()
            }
            ServerTrust::Roots(roots) => builder.with_root_certificates(roots.clone()).with_no_client_auth(),
        };
        config.alpn_protocols = vec![alpn.to_vec()];
        Arc::new(config)
    }

    /// A clear message when the last handshake failed on the pin.
    pub fn mismatch_message(&self) -> Option<String> {
        let ServerTrust::Pinned(v) = self else {
            return None;
        };
        v.last_mismatch().map(|got| {
            format!(
                "server certificate fingerprint is {}, but the join string pins a different one; \
                 the server identity changed or this is not the right server (get a new join string with \
                 `edge-server node rotate-token`)",
                edge_proto::join::hex(&got)
            )
        })
    }
}

/// The name to put in SNI when dialing `host:port`.
pub fn server_name(addr: &str) -> String {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h).trim_matches(['[', ']']);
    if host.parse::<std::net::IpAddr>().is_ok() {
        "edge-server".to_string()
    } else {
        host.to_string()
    }
}
