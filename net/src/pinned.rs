//! Certificate pinning for the agent → server connection.
//!
//! The server's identity is usually self-signed; agents pin the SHA-256 of its
//! DER certificate, taken from the join string. Handshake signatures are still
//! verified with the pinned certificate's key, so only the holder of that key
//! passes. A mismatch is remembered so the agent can say exactly what went
//! wrong instead of a generic handshake error.

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// Accepts exactly the certificate whose SHA-256 is `expected`.
#[derive(Debug)]
pub struct PinnedVerifier {
    expected: [u8; 32],
    provider: Arc<CryptoProvider>,
    mismatch: Mutex<Option<[u8; 32]>>,
}

impl PinnedVerifier {
    /// A verifier pinned to `expected`.
    pub fn new(expected: [u8; 32]) -> Arc<Self> {
        Arc::new(Self {
            expected,
            provider: Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
            mismatch: Mutex::new(None),
        })
    }

    /// The fingerprint the server last presented, if it did not match.
    pub fn last_mismatch(&self) -> Option<[u8; 32]> {
        self.mismatch.lock().map(|m| *m).unwrap_or(None)
    }
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = edge_certs::fingerprint(end_entity);
        if got == self.expected {
            return Ok(ServerCertVerified::assertion());
        }
        if let Ok(mut slot) = self.mismatch.lock() {
            *slot = Some(got);
        }
        Err(rustls::Error::General(format!(
            "server certificate fingerprint {} does not match the pinned {}",
            edge_proto::join::hex(&got),
            edge_proto::join::hex(&self.expected)
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
