//! Generated certificates: the server's self-signed identity, and a local
//! CA plus leaf for a node that has no real certificate yet.
//!
//! Keys are ECDSA P-256. Generated material is written with
//! [`crate::store::write_atomic`] and reused on later starts.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair};

use crate::store::{write_atomic, Sensitivity};
use crate::CertError;

/// Paths of a certificate chain and its key on disk.
#[derive(Debug, Clone)]
pub struct PemPair {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key (mode 0600).
    pub key: PathBuf,
}

/// Loads the server identity from `dir`, creating a self-signed one with the
/// given subject alternative names on first use.
pub fn server_identity(dir: &Path, names: &[String]) -> Result<PemPair, CertError> {
    let pair = PemPair { cert: dir.join("server-identity.crt"), key: dir.join("server-identity.key") };
    // Two processes on a fresh directory (the server and `node add`) must
    // not each write one half of a pair, nor one read a half the other is
    // writing: whoever comes second waits here, then finds both files.
    let _lock = match crate::store::lock_dir(dir, ".server-identity.lock") {
        Ok(lock) => lock,
        // A directory we may not write (a read-only mount) can still hold
        // an identity to load.
        Err(_) if pair.cert.exists() && pair.key.exists() => return Ok(pair),
        Err(e) => return Err(e),
    };
    if pair.cert.exists() && pair.key.exists() {
        return Ok(pair);
    }
    let mut names = names.to_vec();
    if names.is_empty() {
        names.push("edge-server".into());
    }
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(names)?;
    params.distinguished_name = dn("edge-server identity");
    params.not_after = rcgen::date_time_ymd(2100, 1, 1);
    let cert = params.self_signed(&key)?;
    write_atomic(&pair.key, key.serialize_pem().as_bytes(), Sensitivity::Secret)?;
    write_atomic(&pair.cert, cert.pem().as_bytes(), Sensitivity::Public)?;
    tracing::info!(cert = %pair.cert.display(), "generated self-signed server identity");
    Ok(pair)
}

/// A node certificate issued by a local, throwaway CA.
#[derive(Debug, Clone)]
pub struct LocalNodeCert {
    /// Leaf chain and key for TLS termination.
    pub pair: PemPair,
    /// The local CA certificate clients trust (e.g. `curl --cacert`).
    pub ca: PathBuf,
}

/// Loads the node certificate for `hostnames` from `dir`, issuing a new leaf
/// from a new local CA when none exists or the names changed. The CA key is
/// never written: the CA signs this one leaf and is forgotten.
pub fn local_node_cert(dir: &Path, node: &str, hostnames: &[String]) -> Result<LocalNodeCert, CertError> {
    let out = LocalNodeCert {
        pair: PemPair { cert: dir.join(format!("{node}.crt")), key: dir.join(format!("{node}.key")) },
        ca: dir.join(format!("{node}-local-ca.crt")),
    };
    let names_file = dir.join(format!("{node}.names"));
    let wanted = hostnames.join("\n");
    let current = std::fs::read_to_string(&names_file).ok();
    if out.pair.cert.exists() && out.pair.key.exists() && out.ca.exists() && current.as_deref() == Some(&wanted) {
        return Ok(out);
    }
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name = dn(&format!("edge local CA for {node}"));
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf_key = KeyPair::generate()?;
    let mut leaf_params = CertificateParams::new(hostnames.to_vec())?;
    leaf_params.distinguished_name = dn(hostnames.first().map(String::as_str).unwrap_or(node));
    let leaf = leaf_params.signed_by(&leaf_key, &issuer)?;

    write_atomic(&out.pair.key, leaf_key.serialize_pem().as_bytes(), Sensitivity::Secret)?;
    write_atomic(&out.pair.cert, format!("{}{}", leaf.pem(), ca_cert.pem()).as_bytes(), Sensitivity::Public)?;
    write_atomic(&out.ca, ca_cert.pem().as_bytes(), Sensitivity::Public)?;
    write_atomic(&names_file, wanted.as_bytes(), Sensitivity::Public)?;
    tracing::info!(cert = %out.pair.cert.display(), ca = %out.ca.display(), "generated local node certificate");
    Ok(out)
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pem::load_certified_key;

    #[test]
    fn identity_is_created_once_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        let a = server_identity(dir.path(), &["edge.test".into()]).unwrap();
        let first = std::fs::read(&a.cert).unwrap();
        let b = server_identity(dir.path(), &["edge.test".into()]).unwrap();
        assert_eq!(first, std::fs::read(&b.cert).unwrap());
        load_certified_key(&b.cert, &b.key).unwrap();
    }

    #[test]
    fn racing_first_starts_share_one_identity() {
        let dir = tempfile::tempdir().unwrap();
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
        let starts: Vec<_> = (0..8)
            .map(|_| {
                let (dir, barrier) = (dir.path().to_path_buf(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    let pair = server_identity(&dir, &["edge.test".into()]).unwrap();
                    // Every caller loads a matching pair, and the same one.
                    load_certified_key(&pair.cert, &pair.key).unwrap();
                    std::fs::read(&pair.cert).unwrap()
                })
            })
            .collect();
        let certs: Vec<_> = starts.into_iter().map(|s| s.join().unwrap()).collect();
        assert!(certs.iter().all(|c| *c == certs[0]));
    }

    #[test]
    fn node_cert_is_reissued_when_names_change() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["n1.z.test".to_string(), "*.n1.z.test".to_string()];
        let a = local_node_cert(dir.path(), "n1", &names).unwrap();
        let first = std::fs::read(&a.pair.cert).unwrap();
        let b = local_node_cert(dir.path(), "n1", &names).unwrap();
        assert_eq!(first, std::fs::read(&b.pair.cert).unwrap());
        let c = local_node_cert(dir.path(), "n1", &names[..1]).unwrap();
        assert_ne!(first, std::fs::read(&c.pair.cert).unwrap());
        let key = load_certified_key(&c.pair.cert, &c.pair.key).unwrap();
        assert_eq!(key.cert.len(), 2, "leaf and CA");
    }
}
