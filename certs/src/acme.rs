//! ACME (RFC 8555) issuance with DNS-01 challenges, on instant-acme.
//!
//! One [`AcmeClient`] holds the settings and the accounts (created once per
//! directory and persisted). [`AcmeClient::issue`] runs one order: each
//! authorization's DNS-01 value is handed to a [`ChallengeSink`], which
//! returns only once the TXT record is served; then the challenge is set
//! ready, the order polled with backoff, finalized with the caller's CSR,
//! and the chain downloaded. Published values are always removed again. The
//! directories are tried in order, so a second CA takes over when the first
//! fails. Both flows use it: the server (CSR flow, its sink is its own zone)
//! and the agent (node-side flow, its sink is the server's signal API).

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus,
    RetryPolicy,
};

use crate::store::{write_atomic, Sensitivity};
use crate::CertError;

/// How to reach the CA.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeSettings {
    /// ACME directory URLs, tried in order: the next is used when one fails.
    pub directories: Vec<String>,
    /// Contact addresses for the account (`mailto:` is added when missing).
    #[serde(default)]
    pub contact: Vec<String>,
    /// Trust this CA (PEM) for the directories' HTTPS instead of the system
    /// roots (a test CA such as Pebble).
    #[serde(default)]
    pub root_ca_file: Option<PathBuf>,
}

impl AcmeSettings {
    /// Checks values serde cannot; messages name the field under `prefix`.
    pub fn validate(&self, prefix: &str) -> Result<(), String> {
        if self.directories.is_empty() {
            return Err(format!("{prefix}.directories: at least one ACME directory URL is needed"));
        }
        for url in &self.directories {
            if !url.starts_with("https://") || url.len() <= "https://".len() {
                return Err(format!("{prefix}.directories: {url:?} must be an https:// URL"));
            }
        }
        for c in &self.contact {
            if c.is_empty() || c.contains(char::is_whitespace) {
                return Err(format!("{prefix}.contact: {c:?} is not an e-mail address"));
            }
        }
        Ok(())
    }
}

/// A boxed future, for the object-safe [`ChallengeSink`].
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Which ACME challenge an order answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChallengeKind {
    /// DNS-01: a TXT value at `_acme-challenge.<host>` (the cluster's zone).
    Dns01,
    /// TLS-ALPN-01 (RFC 8737): a certificate served on :443 to the CA's
    /// connection with ALPN `acme-tls/1` (customers' own domains, whose DNS
    /// is not ours).
    TlsAlpn01,
}

/// Publishes and removes challenge answers.
pub trait ChallengeSink: Send + Sync {
    /// Publishes `value` at `name` (`_acme-challenge.<host>`); resolves once
    /// the authoritative DNS serves it.
    fn publish<'a>(&'a self, name: &'a str, value: &'a str) -> BoxFuture<'a, Result<(), String>>;
    /// Removes one value again.
    fn remove<'a>(&'a self, name: &'a str, value: &'a str) -> BoxFuture<'a, Result<(), String>>;
    /// Serves a TLS-ALPN-01 answer for `host`: the SHA-256 of the key
    /// authorization goes into the `acmeIdentifier` extension of a
    /// certificate for `host`. Resolves once it is served.
    fn publish_tls_alpn<'a>(&'a self, host: &'a str, digest: [u8; 32]) -> BoxFuture<'a, Result<(), String>> {
        let _ = (host, digest);
        Box::pin(async { Err("TLS-ALPN-01 answers are not served here".to_string()) })
    }
    /// Stops serving the TLS-ALPN-01 answer for `host`.
    fn remove_tls_alpn<'a>(&'a self, host: &'a str) -> BoxFuture<'a, Result<(), String>> {
        let _ = host;
        Box::pin(async { Ok(()) })
    }
}

/// Errors of an issuance.
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    /// One directory failed; carries the CA's or the transport's message.
    #[error("ACME {directory}: {message}")]
    Ca {
        /// The directory URL.
        directory: String,
        /// What failed.
        message: String,
    },
    /// Every configured directory failed; the messages are joined.
    #[error("every ACME directory failed: {0}")]
    AllFailed(String),
    /// The account could not be stored.
    #[error(transparent)]
    Store(#[from] CertError),
}

/// The result of a successful order.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Leaf first, then intermediates, PEM.
    pub chain_pem: String,
    /// The directory that issued it.
    pub directory: String,
    /// The CA's suggested renewal window (Unix seconds), where it offers ACME
    /// Renewal Info.
    pub renewal_window: Option<(i64, i64)>,
}

/// Where a cluster keeps its ACME accounts, so every server orders with the
/// same one. Values are the account's JSON (with its private key: keep the
/// vault as secret as the key files).
pub trait AccountVault: Send + Sync {
    /// The account stored under `key`, if any.
    fn load<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<String>, String>>;
    /// Stores `json` under `key` unless an account is there already;
    /// returns the one stored (of servers racing, one account wins).
    fn store_if_absent<'a>(&'a self, key: &'a str, json: &'a str) -> BoxFuture<'a, Result<String, String>>;
}

/// An ACME client with persisted accounts.
pub struct AcmeClient {
    settings: AcmeSettings,
    account_dir: PathBuf,
    vault: Option<std::sync::Arc<dyn AccountVault>>,
    accounts: tokio::sync::Mutex<HashMap<String, Account>>,
    /// How long to wait for an order to become ready or valid.
    pub order_timeout: Duration,
}

impl std::fmt::Debug for AcmeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcmeClient").field("settings", &self.settings).field("account_dir", &self.account_dir).finish()
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct StoredAccount {
    directory: String,
    credentials: AccountCredentials,
}

impl AcmeClient {
    /// A client; accounts are kept in `account_dir` (files mode 0600).
    pub fn new(settings: AcmeSettings, account_dir: &Path) -> Self {
        // instant-acme builds its rustls config with the process default.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        Self {
            settings,
            account_dir: account_dir.to_path_buf(),
            vault: None,
            accounts: tokio::sync::Mutex::new(HashMap::new()),
            order_timeout: Duration::from_secs(180),
        }
    }

    /// Keeps accounts in `vault` instead of `account_dir` (a cluster's
    /// store: one account for all its servers).
    pub fn with_vault(mut self, vault: std::sync::Arc<dyn AccountVault>) -> Self {
        self.vault = Some(vault);
        self
    }

    fn account_file(&self, directory: &str) -> PathBuf {
        let digest = crate::fingerprint(directory.as_bytes());
        let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        self.account_dir.join(format!("account-{hex}.json"))
    }

    fn builder(&self) -> Result<instant_acme::AccountBuilder, String> {
        match &self.settings.root_ca_file {
            Some(path) => Account::builder_with_root(path).map_err(|e| format!("root_ca_file {}: {e}", path.display())),
            None => Account::builder().map_err(|e| e.to_string()),
        }
    }

    /// The account at `directory`: from memory, from its file, or created
    /// (and stored) on first use.
    async fn account(&self, directory: &str) -> Result<Account, AcmeError> {
        let ca = |message: String| AcmeError::Ca { directory: directory.to_string(), message };
        let mut accounts = self.accounts.lock().await;
        if let Some(account) = accounts.get(directory) {
            return Ok(account.clone());
        }
        let path = self.account_file(directory);
        let key = format!("acme-account:{directory}");
        let from_file = || std::fs::read(&path).ok().and_then(|b| serde_json::from_slice::<StoredAccount>(&b).ok());
        let stored = match &self.vault {
            Some(vault) => match vault.load(&key).await.map_err(ca)? {
                Some(json) => serde_json::from_str::<StoredAccount>(&json).ok(),
                // An account this server kept in its file before it used a
                // vault moves there, so its orders keep their account.
                None => match std::fs::read_to_string(&path) {
                    Ok(json) if from_file().is_some() => {
                        let kept = vault.store_if_absent(&key, &json).await.map_err(ca)?;
                        serde_json::from_str::<StoredAccount>(&kept).ok()
                    }
                    _ => None,
                },
            },
            None => from_file(),
        };
        let account = match stored.filter(|s| s.directory == directory) {
            Some(stored) => {
                self.builder().map_err(ca)?.from_credentials(stored.credentials).await.map_err(|e| ca(e.to_string()))?
            }
            None => {
                let contact: Vec<String> = self
                    .settings
                    .contact
                    .iter()
                    .map(|c| if c.starts_with("mailto:") { c.clone() } else { format!("mailto:{c}") })
                    .collect();
                let contact_refs: Vec<&str> = contact.iter().map(String::as_str).collect();
                let new =
                    NewAccount { contact: &contact_refs, terms_of_service_agreed: true, only_return_existing: false };
                let (account, credentials) = self
                    .builder()
                    .map_err(ca)?
                    .create(&new, directory.to_string(), None)
                    .await
                    .map_err(|e| ca(format!("creating account: {e}")))?;
                let json =
                    serde_json::to_string_pretty(&StoredAccount { directory: directory.to_string(), credentials })
                        .map_err(|e| ca(e.to_string()))?;
                match &self.vault {
                    Some(vault) => {
                        let kept = vault.store_if_absent(&key, &json).await.map_err(ca)?;
                        if kept == json {
                            tracing::info!(%directory, "ACME account created and stored for the cluster");
                            account
                        } else {
                            // Another server created one first: use that one.
                            let theirs: StoredAccount =
                                serde_json::from_str(&kept).map_err(|e| ca(format!("stored account: {e}")))?;
                            self.builder()
                                .map_err(ca)?
                                .from_credentials(theirs.credentials)
                                .await
                                .map_err(|e| ca(e.to_string()))?
                        }
                    }
                    None => {
                        write_atomic(&path, json.as_bytes(), Sensitivity::Secret)?;
                        tracing::info!(%directory, account = %path.display(), "ACME account created");
                        account
                    }
                }
            }
        };
        accounts.insert(directory.to_string(), account.clone());
        Ok(account)
    }

    /// Obtains a certificate for `names` with the CSR `csr_der` by DNS-01,
    /// trying each directory in order.
    pub async fn issue(&self, names: &[String], csr_der: &[u8], sink: &dyn ChallengeSink) -> Result<Issued, AcmeError> {
        self.issue_by(names, csr_der, sink, ChallengeKind::Dns01).await
    }

    /// [`AcmeClient::issue`] answering challenges of `kind`.
    pub async fn issue_by(
        &self,
        names: &[String],
        csr_der: &[u8],
        sink: &dyn ChallengeSink,
        kind: ChallengeKind,
    ) -> Result<Issued, AcmeError> {
        let mut failures = Vec::new();
        for directory in &self.settings.directories {
            // Polling is bounded by instant-acme; plain requests are not, so
            // a CA that stalls a connection gets the same deadline overall.
            let attempt =
                tokio::time::timeout(self.order_timeout * 2, self.issue_at(directory, names, csr_der, sink, kind));
            let result = attempt.await.unwrap_or_else(|_| {
                Err(AcmeError::Ca {
                    directory: directory.clone(),
                    message: format!("no result within {:?}", self.order_timeout * 2),
                })
            });
            match result {
                Ok(issued) => return Ok(issued),
                Err(e) => {
                    tracing::warn!(%directory, error = %e, "ACME order failed at this directory");
                    failures.push(e.to_string());
                }
            }
        }
        Err(AcmeError::AllFailed(failures.join("; ")))
    }

    async fn issue_at(
        &self,
        directory: &str,
        names: &[String],
        csr_der: &[u8],
        sink: &dyn ChallengeSink,
        kind: ChallengeKind,
    ) -> Result<Issued, AcmeError> {
        let ca = |message: String| AcmeError::Ca { directory: directory.to_string(), message };
        let account = self.account(directory).await?;
        let identifiers: Vec<Identifier> = names.iter().map(|n| Identifier::Dns(n.clone())).collect();
        let mut order =
            account.new_order(&NewOrder::new(&identifiers)).await.map_err(|e| ca(format!("new order: {e}")))?;
        tracing::info!(%directory, names = ?names, order = order.url(), "ACME: order created");
        let mut published: Vec<(String, String)> = Vec::new();
        let mut alpn_served: Vec<String> = Vec::new();
        let result = async {
            let mut authorizations = order.authorizations();
            while let Some(authz) = authorizations.next().await {
                let mut authz = authz.map_err(|e| ca(format!("authorization: {e}")))?;
                match authz.status {
                    AuthorizationStatus::Valid => continue,
                    AuthorizationStatus::Pending => {}
                    other => return Err(ca(format!("authorization is {other:?}"))),
                }
                let wanted = match kind {
                    ChallengeKind::Dns01 => ChallengeType::Dns01,
                    ChallengeKind::TlsAlpn01 => ChallengeType::TlsAlpn01,
                };
                let mut challenge = authz
                    .challenge(wanted.clone())
                    .ok_or_else(|| ca(format!("the CA offers no {wanted:?} challenge")))?;
                let host = match challenge.identifier().identifier {
                    Identifier::Dns(host) => host.trim_start_matches("*.").to_string(),
                    other => return Err(ca(format!("unexpected identifier {other:?}"))),
                };
                if kind == ChallengeKind::TlsAlpn01 {
                    let mut digest = [0u8; 32];
                    digest.copy_from_slice(challenge.key_authorization().digest().as_ref());
                    alpn_served.push(host.clone());
                    sink.publish_tls_alpn(&host, digest)
                        .await
                        .map_err(|e| ca(format!("serving the TLS-ALPN-01 answer for {host}: {e}")))?;
                    tracing::info!(%host, "ACME: TLS-ALPN-01 answer served; asking the CA to validate");
                    challenge.set_ready().await.map_err(|e| ca(format!("challenge ready: {e}")))?;
                    continue;
                }
                let name = format!("_acme-challenge.{host}");
                let value = challenge.key_authorization().dns_value();
                // Recorded first: a publish that fails half-way is removed too.
                published.push((name.clone(), value.clone()));
                sink.publish(&name, &value).await.map_err(|e| ca(format!("publishing TXT {name}: {e}")))?;
                tracing::info!(%name, "ACME: TXT published and served; asking the CA to validate");
                challenge.set_ready().await.map_err(|e| ca(format!("challenge ready: {e}")))?;
            }
            let retry = RetryPolicy::new().timeout(self.order_timeout);
            let status = order.poll_ready(&retry).await.map_err(|e| ca(format!("waiting for validation: {e}")))?;
            if status != OrderStatus::Ready {
                return Err(ca(format!(
                    "order is {status:?} after validation (the CA could not verify the {kind:?} answers)"
                )));
            }
            tracing::info!(%directory, names = ?names, "ACME: validated");
            order.finalize_csr(csr_der).await.map_err(|e| ca(format!("finalize: {e}")))?;
            order.poll_certificate(&retry).await.map_err(|e| ca(format!("downloading certificate: {e}")))
        }
        .await;
        for (name, value) in &published {
            if let Err(e) = sink.remove(name, value).await {
                tracing::warn!(%name, error = %e, "removing a DNS-01 TXT value failed; the server expires it later");
            }
        }
        for host in &alpn_served {
            if let Err(e) = sink.remove_tls_alpn(host).await {
                tracing::warn!(%host, error = %e, "removing a TLS-ALPN-01 answer failed");
            }
        }
        let chain_pem = result?;
        let renewal_window = self.renewal_window(&account, &chain_pem).await;
        if let Some(info) = leaf_info(&chain_pem) {
            tracing::info!(%directory, names = ?info.names, serial = %info.serial,
                not_after = %crate::format_unix(info.not_after), "ACME: certificate issued");
        }
        Ok(Issued { chain_pem, directory: directory.to_string(), renewal_window })
    }

    /// The CA's ACME Renewal Info window for the leaf of `chain_pem`, where
    /// the CA offers it; `None` otherwise (the lifetime rule applies).
    async fn renewal_window(&self, account: &Account, chain_pem: &str) -> Option<(i64, i64)> {
        let der = rustls_pemfile::certs(&mut chain_pem.as_bytes()).next()?.ok()?;
        let id = instant_acme::CertificateIdentifier::try_from(&der).ok()?;
        match account.renewal_info(&id).await {
            Ok((info, _)) => {
                Some((info.suggested_window.start.unix_timestamp(), info.suggested_window.end.unix_timestamp()))
            }
            Err(e) => {
                tracing::debug!(error = %e, "no ACME renewal info");
                None
            }
        }
    }
}

/// Facts of the first certificate of a PEM chain.
pub fn leaf_info(chain_pem: &str) -> Option<crate::info::CertInfo> {
    let der = rustls_pemfile::certs(&mut chain_pem.as_bytes()).next()?.ok()?;
    crate::info::cert_info(&der).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_validation_names_fields() {
        let ok = AcmeSettings { directories: vec!["https://ca/dir".into()], contact: vec![], root_ca_file: None };
        ok.validate("acme").unwrap();
        let none = AcmeSettings { directories: vec![], ..ok.clone() };
        assert!(none.validate("acme").unwrap_err().contains("acme.directories"));
        let http = AcmeSettings { directories: vec!["http://ca/dir".into()], ..ok.clone() };
        assert!(http.validate("acme").unwrap_err().contains("https://"));
        let contact = AcmeSettings { contact: vec!["a b".into()], ..ok };
        assert!(contact.validate("acme").unwrap_err().contains("acme.contact"));
    }
}
