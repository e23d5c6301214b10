//! The certificate that answers an ACME TLS-ALPN-01 challenge (RFC 8737):
//! self-signed, for exactly the validated name, with the SHA-256 of the key
//! authorization in a critical `acmeIdentifier` extension. Its key is made
//! for the one validation and never stored.

use std::sync::Arc;

use rcgen::{CertificateParams, CustomExtension, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;

use crate::CertError;

/// OID of the `acmeIdentifier` extension (id-pe-acmeIdentifier, 1.3.6.1.5.5.7.1.31).
pub const ACME_IDENTIFIER_OID: &str = "1.3.6.1.5.5.7.1.31";

/// A challenge certificate for `host` carrying `digest`.
pub fn challenge_certificate(host: &str, digest: &[u8; 32]) -> Result<Arc<CertifiedKey>, CertError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(vec![host.to_string()])?;
    params.custom_extensions = vec![CustomExtension::new_acme_identifier(digest)];
    let cert = params.self_signed(&key)?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signer = rustls::crypto::aws_lc_rs::sign::any_supported_type(&der)
        .map_err(|e| CertError::Invalid(format!("challenge key: {e}")))?;
    Ok(Arc::new(CertifiedKey::new(vec![CertificateDer::from(cert.der().to_vec())], signer)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carries_the_digest_in_a_critical_extension_for_the_name() {
        let digest = [7u8; 32];
        let key = challenge_certificate("www.customer.test", &digest).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(key.cert[0].as_ref()).unwrap();
        let ext = cert
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == ACME_IDENTIFIER_OID)
            .expect("acmeIdentifier extension");
        assert!(ext.critical);
        // DER OCTET STRING of 32 bytes.
        assert_eq!(ext.value[..2], [0x04, 32]);
        assert_eq!(&ext.value[2..], &digest);
        let info = crate::info::cert_info(key.cert[0].as_ref()).unwrap();
        assert_eq!(info.names, vec!["www.customer.test".to_string()]);
    }
}
