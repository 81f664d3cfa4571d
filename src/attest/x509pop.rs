//! The `x509pop` attestor: a client certificate presented over mTLS, proof of possession done
//! by the TLS handshake, chain verified here (rustls-webpki) against configured CA bundles at
//! the broker's clock time.
//!
//! Claims: `subject`, `cn`, `issuer`, `serial`, `fingerprint_sha256` (of the leaf DER),
//! `san_dns`, `san_uri`, `san_email`, `san_ip` (lists).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, UnixTime};
use serde_json::{Map, Value};
use webpki::{EndEntityCert, KeyUsage};
use x509_parser::extensions::GeneralName;

use super::{AttestError, AttestedIdentity, Attestor, BoxFuture, Evidence};
use crate::ca::der::hex;
use crate::clock::Clock;

/// The attestor's name in mapping rules.
pub const NAME: &str = "x509pop";
/// Longest chain accepted (leaf + intermediates).
pub const MAX_CHAIN: usize = 8;

/// Trust anchors for client certificates.
pub struct ClientCas {
    anchors: Vec<rustls::pki_types::TrustAnchor<'static>>,
    /// DER subjects, sent as TLS hints.
    pub subjects: Vec<Vec<u8>>,
}

impl ClientCas {
    /// Trust anchors from DER certificates.
    pub fn from_der(certs: &[Vec<u8>]) -> Result<Self, String> {
        let mut anchors = Vec::new();
        let mut subjects = Vec::new();
        for der in certs {
            let der = CertificateDer::from(der.clone());
            anchors.push(
                webpki::anchor_from_trusted_cert(&der)
                    .map_err(|e| format!("not a usable CA certificate: {e:?}"))?
                    .to_owned(),
            );
            let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| e.to_string())?;
            subjects.push(cert.subject().as_raw().to_vec());
        }
        Ok(Self { anchors, subjects })
    }

    /// Loads every certificate in the PEM `files`.
    pub fn load(files: &[impl AsRef<Path>]) -> Result<Self, String> {
        let mut anchors = Vec::new();
        let mut subjects = Vec::new();
        for f in files {
            let f = f.as_ref();
            let text = std::fs::read(f).map_err(|e| format!("{}: {e}", f.display()))?;
            let pems = pem::parse_many(&text).map_err(|e| format!("{}: {e}", f.display()))?;
            let mut found = false;
            for p in pems.into_iter().filter(|p| p.tag() == "CERTIFICATE") {
                let der = CertificateDer::from(p.into_contents());
                let anchor = webpki::anchor_from_trusted_cert(&der)
                    .map_err(|e| format!("{}: not a usable CA certificate: {e:?}", f.display()))?
                    .to_owned();
                let (_, cert) = x509_parser::parse_x509_certificate(&der)
                    .map_err(|e| format!("{}: {e}", f.display()))?;
                subjects.push(cert.subject().as_raw().to_vec());
                anchors.push(anchor);
                found = true;
            }
            if !found {
                return Err(format!("{}: no CERTIFICATE found", f.display()));
            }
        }
        Ok(Self { anchors, subjects })
    }
}

/// The `x509pop` attestor.
pub struct X509PopAttestor {
    cas: ClientCas,
    clock: Arc<dyn Clock>,
}

impl X509PopAttestor {
    /// An attestor trusting `cas`.
    pub fn new(cas: ClientCas, clock: Arc<dyn Clock>) -> Self {
        Self { cas, clock }
    }

    /// Verifies a client certificate chain and returns its identity and claims.
    pub fn verify(
        &self,
        chain: &[CertificateDer<'static>],
    ) -> Result<AttestedIdentity, AttestError> {
        let invalid = |m: &str| AttestError::CertificateInvalid(m.to_owned());
        let (leaf, intermediates) = chain
            .split_first()
            .ok_or_else(|| invalid("no client certificate"))?;
        if chain.len() > MAX_CHAIN {
            return Err(invalid("client certificate chain is too long"));
        }
        let ee = EndEntityCert::try_from(leaf)
            .map_err(|_| invalid("client certificate cannot be parsed"))?;
        let now = self
            .clock
            .now()
            .duration_since(std::time::SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let algs = rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .all;
        ee.verify_for_usage(
            algs,
            &self.cas.anchors,
            intermediates,
            UnixTime::since_unix_epoch(now),
            KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| {
            invalid(match e {
                webpki::Error::CertExpired { .. } => "client certificate has expired",
                webpki::Error::CertNotValidYet { .. } => "client certificate is not valid yet",
                webpki::Error::UnknownIssuer => "client certificate is not issued by a trusted CA",
                webpki::Error::RequiredEkuNotFoundContext(_) => {
                    "client certificate is not for client authentication"
                }
                _ => "client certificate is not valid",
            })
        })?;
        let (_, cert) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|_| invalid("client certificate cannot be parsed"))?;
        let mut claims = Map::new();
        claims.insert("subject".into(), Value::from(cert.subject().to_string()));
        claims.insert("issuer".into(), Value::from(cert.issuer().to_string()));
        if let Some(cn) = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|c| c.as_str().ok())
        {
            claims.insert("cn".into(), Value::from(cn));
        }
        claims.insert("serial".into(), Value::from(hex(cert.raw_serial())));
        claims.insert(
            "fingerprint_sha256".into(),
            Value::from(hex(
                ring::digest::digest(&ring::digest::SHA256, leaf).as_ref()
            )),
        );
        let (mut dns, mut uri, mut email, mut ip) = (vec![], vec![], vec![], vec![]);
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for n in &san.value.general_names {
                match n {
                    GeneralName::DNSName(d) => dns.push(Value::from(*d)),
                    GeneralName::URI(u) => uri.push(Value::from(*u)),
                    GeneralName::RFC822Name(e) => email.push(Value::from(*e)),
                    GeneralName::IPAddress(b) => {
                        let addr = match b.len() {
                            4 => <[u8; 4]>::try_from(*b).ok().map(std::net::IpAddr::from),
                            16 => <[u8; 16]>::try_from(*b).ok().map(std::net::IpAddr::from),
                            _ => None,
                        };
                        if let Some(a) = addr {
                            ip.push(Value::from(a.to_string()));
                        }
                    }
                    _ => {}
                }
            }
        }
        claims.insert("san_dns".into(), Value::from(dns));
        claims.insert("san_uri".into(), Value::from(uri));
        claims.insert("san_email".into(), Value::from(email));
        claims.insert("san_ip".into(), Value::from(ip));
        let not_after = u64::try_from(cert.validity().not_after.timestamp())
            .ok()
            .map(|s| std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(s));
        let not_before = u64::try_from(cert.validity().not_before.timestamp())
            .ok()
            .map(|s| std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(s));
        Ok(AttestedIdentity {
            attestor: NAME,
            subject: cert.subject().to_string(),
            claims,
            issued_at: not_before,
            expires_at: not_after,
            single_use: None,
        })
    }
}

impl Attestor for X509PopAttestor {
    fn name(&self) -> &'static str {
        NAME
    }

    fn attest<'a>(
        &'a self,
        evidence: &'a Evidence,
    ) -> BoxFuture<'a, Result<Option<AttestedIdentity>, AttestError>> {
        Box::pin(async move {
            match &evidence.client_chain {
                Some(chain) if !chain.is_empty() => self.verify(chain).map(Some),
                _ => Ok(None),
            }
        })
    }
}
