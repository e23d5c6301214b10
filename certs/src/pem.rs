//! Loading certificate chains and private keys from PEM files.

use std::path::Path;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::CertError;

/// Reads every `CERTIFICATE` block of a PEM file, leaf first.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let data = read(path)?;
    let certs = rustls_pemfile::certs(&mut data.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, format!("invalid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(pem_error(path, "no CERTIFICATE block found".into()));
    }
    Ok(certs)
}

/// Reads the first private key (PKCS#8, PKCS#1 or SEC1) of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, CertError> {
    let data = read(path)?;
    rustls_pemfile::private_key(&mut data.as_slice())
        .map_err(|e| pem_error(path, format!("invalid PEM: {e}")))?
        .ok_or_else(|| pem_error(path, "no PRIVATE KEY block found".into()))
}

/// Builds a rustls signing key from a certificate chain and key file pair,
/// checking that the key matches the certificate.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<rustls::sign::CertifiedKey, CertError> {
    let chain = load_certs(cert)?;
    let key_der = load_key(key)?;
    certified_key(chain, key_der, key, cert)
}

/// Builds a rustls signing key from one PEM file holding the private key
/// and the chain (leaf first), as the ACME store keeps them.
pub fn load_bundle(path: &Path) -> Result<rustls::sign::CertifiedKey, CertError> {
    let chain = load_certs(path)?;
    let key_der = load_key(path)?;
    certified_key(chain, key_der, path, path)
}

fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key_der: PrivateKeyDer<'static>,
    key: &Path,
    cert: &Path,
) -> Result<rustls::sign::CertifiedKey, CertError> {
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| pem_error(key, format!("unsupported private key: {e}")))?;
    let certified = rustls::sign::CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|e| pem_error(key, format!("key does not match certificate {}: {e}", cert.display())))?;
    Ok(certified)
}

fn read(path: &Path) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|source| CertError::Io { path: path.to_path_buf(), source })
}

fn pem_error(path: &Path, what: String) -> CertError {
    CertError::Pem { path: path.to_path_buf(), what }
}
