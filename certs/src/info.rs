//! What a certificate or CSR says: names, issuer, serial, validity. Used for
//! `cert status`, renewal scheduling, metrics, and by the server to check
//! that a node's CSR asks only for that node's own names.

use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

/// The facts of one certificate.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CertInfo {
    /// DNS names in the subject alternative name extension.
    pub names: Vec<String>,
    /// Issuer distinguished name.
    pub issuer: String,
    /// Serial number, hex with colons.
    pub serial: String,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
}

/// Reads a DER certificate.
pub fn cert_info(der: &[u8]) -> Result<CertInfo, String> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(dns) = name {
                names.push(dns.to_ascii_lowercase());
            }
        }
    }
    Ok(CertInfo {
        names,
        issuer: cert.issuer().to_string(),
        serial: cert.raw_serial_as_string(),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    })
}

/// The DNS names a CSR asks for (subject CN and SAN), lowercased and
/// deduplicated. Anything that is not a DNS name (an IP address, an e-mail
/// address, a URI) is an error: nodes only get certificates for their names.
pub fn csr_names(der: &[u8]) -> Result<Vec<String>, String> {
    let (rest, csr) = X509CertificationRequest::from_der(der).map_err(|e| format!("not a PKCS#10 CSR: {e}"))?;
    if !rest.is_empty() {
        return Err("trailing bytes after the CSR".into());
    }
    let mut names = Vec::new();
    for cn in csr.certification_request_info.subject.iter_common_name() {
        let cn = cn.as_str().map_err(|_| "subject CN is not a string".to_string())?;
        names.push(cn.to_ascii_lowercase());
    }
    let requests = csr
        .certification_request_info
        .iter_attributes()
        .filter(|a| {
            matches!(a.parsed_attribute(), x509_parser::cri_attributes::ParsedCriAttribute::ExtensionRequest(_))
        })
        .count();
    if requests > 1 {
        return Err("CSR has more than one extension request".into());
    }
    for ext in csr.requested_extensions().into_iter().flatten() {
        match ext {
            ParsedExtension::SubjectAlternativeName(san) => {
                for name in &san.general_names {
                    match name {
                        GeneralName::DNSName(dns) => names.push(dns.to_ascii_lowercase()),
                        other => return Err(format!("CSR asks for a non-DNS name: {other}")),
                    }
                }
            }
            // An extension we cannot read could hide names: refuse.
            ParsedExtension::ParseError { error } => return Err(format!("CSR extension does not parse: {error}")),
            _ => {}
        }
    }
    names.sort();
    names.dedup();
    if names.is_empty() {
        return Err("CSR names no DNS name".into());
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr_for(names: &[&str], cn: Option<&str>) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = cn {
            params.distinguished_name.push(rcgen::DnType::CommonName, cn);
        }
        params.serialize_request(&key).unwrap().der().to_vec()
    }

    #[test]
    fn csr_names_cover_cn_and_san() {
        let der = csr_for(&["N1.example.com", "*.n1.example.com"], Some("n1.example.com"));
        assert_eq!(csr_names(&der).unwrap(), vec!["*.n1.example.com", "n1.example.com"]);
    }

    #[test]
    fn csr_with_ip_or_nothing_is_refused() {
        let der = csr_for(&["127.0.0.1"], None);
        assert!(csr_names(&der).unwrap_err().contains("non-DNS"));
        assert!(csr_names(b"garbage").is_err());
        let mut der = csr_for(&["a.example.com"], None);
        der.push(0);
        assert!(csr_names(&der).is_err());
    }

    #[test]
    fn cert_info_reads_names_and_validity() {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["a.example.com".to_string()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let info = cert_info(cert.der()).unwrap();
        assert_eq!(info.names, vec!["a.example.com"]);
        assert!(info.not_after > info.not_before);
        assert!(!info.serial.is_empty());
    }
}
