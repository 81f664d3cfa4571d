//! X.509-SVID minting (SPIFFE X509-SVID spec).
//!
//! Every leaf has exactly one URI SAN (the SPIFFE ID), `CA:FALSE`, a critical keyUsage with
//! digitalSignature only, EKU serverAuth + clientAuth, a serial of issue time and 64 random
//! bits, notBefore backdated a few seconds for clock skew, and a CRL distribution point. From a
//! CSR only the public key is used: its subject, SANs and extensions are never copied, and a CSR
//! asking to be a CA is refused. Never logs CSR or key bytes.
//!
//! rcgen encodes one leaf when the minter starts; each X.509-SVID is then written from that
//! template's pieces (serial, validity, key, SAN and key identifier are the parts that differ)
//! and signed, with no general ASN.1 writer on the path that runs for every credential.

use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use rcgen::{
    CertificateParams, CrlDistributionPoint, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384,
    PKCS_ED25519, PKCS_RSA_SHA256, PublicKeyData, SanType, SerialNumber, SignatureAlgorithm,
    SigningKey,
};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::ParsedExtension;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

use super::MintError;
use super::crl::RevokedSet;
use super::der;
use crate::clock::unix_secs;
use crate::id::SpiffeId;
use crate::secret::Secret;

/// Largest CSR accepted, in bytes (PEM or DER).
pub const MAX_CSR_BYTES: usize = 16 * 1024;
/// How far notBefore is set before the time of minting, for clock skew between hosts.
pub const BACKDATE: Duration = Duration::from_secs(10);

/// A 128-bit certificate serial number (positive, always 16 bytes when DER-encoded).
///
/// The first half orders serials by issue time (microseconds since the Unix epoch); the second
/// is 64 bits from the system's CSPRNG, so serials stay unguessable and non-sequential (the
/// CA/Browser Forum's rule asks for at least 64 random bits). Time order is for the stores:
/// the unique index on serials then grows at its end, as lease ids (UUIDv7) do, instead of each
/// X.509 lease dirtying a random page of it in every commit.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Serial([u8; 16]);

impl Serial {
    /// A fresh serial for a certificate issued at `now`. The top bit is cleared (serials are
    /// positive) and the next one set, so the encoding is always exactly 16 bytes.
    pub fn new(rng: &SystemRandom, now: SystemTime) -> Result<Self, MintError> {
        let mut b = [0u8; 16];
        rng.fill(&mut b[8..])
            .map_err(|_| MintError::Signing("random number generator failed".into()))?;
        let micros = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        // 56 bits of microseconds last until the year 4253.
        b[..8].copy_from_slice(&(micros & ((1 << 56) - 1)).to_be_bytes());
        b[0] = 0x40;
        Ok(Self(b))
    }

    /// The serial's bytes, big-endian.
    pub fn bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&super::der::hex(&self.0))
    }
}

impl fmt::Debug for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Serial({self})")
    }
}

/// The public key of a verified CSR.
#[derive(Clone)]
pub struct CsrKey {
    raw: Vec<u8>,
    alg: &'static SignatureAlgorithm,
}

impl PublicKeyData for CsrKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.alg
    }
}

/// Parses and verifies a PKCS#10 CSR (PEM or DER) and returns its public key.
///
/// Refused: over [`MAX_CSR_BYTES`], unparsable, bad signature, a CA or certificate-signing
/// request, or a key type other than ECDSA P-256/P-384, Ed25519 or RSA 2048–8192.
pub fn parse_csr(input: &[u8]) -> Result<CsrKey, MintError> {
    if input.len() > MAX_CSR_BYTES {
        return Err(MintError::CsrTooLarge {
            size: input.len(),
            max: MAX_CSR_BYTES,
        });
    }
    let der_owned;
    let der: &[u8] = if input.trim_ascii_start().starts_with(b"-----BEGIN") {
        let p = pem::parse(input).map_err(|e| MintError::CsrMalformed(format!("bad PEM: {e}")))?;
        if !matches!(p.tag(), "CERTIFICATE REQUEST" | "NEW CERTIFICATE REQUEST") {
            return Err(MintError::CsrMalformed(format!(
                "expected a CERTIFICATE REQUEST PEM block, found {}",
                p.tag()
            )));
        }
        der_owned = p.into_contents();
        &der_owned
    } else {
        input
    };
    let (rest, csr) = X509CertificationRequest::from_der(der)
        .map_err(|e| MintError::CsrMalformed(format!("not a PKCS#10 request: {e}")))?;
    if !rest.is_empty() {
        return Err(MintError::CsrMalformed(
            "trailing bytes after the request".into(),
        ));
    }
    csr.verify_signature()
        .map_err(|_| MintError::CsrSignature)?;
    if let Some(exts) = csr.requested_extensions() {
        for ext in exts {
            match ext {
                ParsedExtension::BasicConstraints(bc) if bc.ca => {
                    return Err(MintError::CsrRequestsCa);
                }
                ParsedExtension::KeyUsage(ku) if ku.key_cert_sign() || ku.crl_sign() => {
                    return Err(MintError::CsrRequestsCa);
                }
                // Everything else (SANs, EKUs, custom extensions) is ignored: the broker decides
                // every field of the certificate itself.
                _ => {}
            }
        }
    }
    let spki = &csr.certification_request_info.subject_pki;
    let alg_oid = &spki.algorithm.algorithm;
    let alg: &'static SignatureAlgorithm = if *alg_oid == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        match curve {
            Some(c) if c == OID_EC_P256 => &PKCS_ECDSA_P256_SHA256,
            Some(c) if c == OID_NIST_EC_P384 => &PKCS_ECDSA_P384_SHA384,
            _ => {
                return Err(MintError::CsrUnsupportedKey(
                    "only the P-256 and P-384 curves are accepted".into(),
                ));
            }
        }
    } else if *alg_oid == OID_SIG_ED25519 {
        &PKCS_ED25519
    } else if *alg_oid == OID_PKCS1_RSAENCRYPTION {
        match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) if (2048..=8192).contains(&rsa.key_size()) => &PKCS_RSA_SHA256,
            _ => {
                return Err(MintError::CsrUnsupportedKey(
                    "RSA keys must be 2048 to 8192 bits".into(),
                ));
            }
        }
    } else {
        return Err(MintError::CsrUnsupportedKey(format!(
            "key algorithm {alg_oid} is not supported (use ECDSA P-256)"
        )));
    };
    Ok(CsrKey {
        raw: spki.subject_public_key.data.to_vec(),
        alg,
    })
}

/// Where the subject key of a new certificate comes from.
pub enum SubjectKey {
    /// The public key of a verified CSR.
    Csr(CsrKey),
    /// A P-256 key generated by the broker and returned with the certificate.
    Generate,
}

/// A minted X.509-SVID.
#[derive(Debug)]
pub struct X509Svid {
    /// DER certificates, leaf first, then the intermediate.
    pub cert_chain: Vec<Vec<u8>>,
    /// PKCS#8 DER private key, when the broker generated it.
    pub private_key: Option<Secret<Vec<u8>>>,
    /// The leaf's serial.
    pub serial: Serial,
    /// The leaf's notAfter.
    pub not_after: SystemTime,
}

/// A TLS serving identity for the broker itself.
pub struct ServingIdentity {
    /// DER chain: leaf then intermediate.
    pub chain: Vec<Vec<u8>>,
    /// PKCS#8 DER private key.
    pub key: Secret<Vec<u8>>,
}

/// Signs X.509-SVIDs with the intermediate CA.
pub struct X509Minter {
    issuer: Issuer<'static, KeyPair>,
    leaf: LeafTemplate,
    intermediate_der: Vec<u8>,
    ca_not_after: SystemTime,
    crl_url: Option<String>,
    rng: SystemRandom,
}

/// Truncates to whole seconds (what X.509 times can carry).
fn whole_secs(t: SystemTime) -> SystemTime {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

/// DER of the subjectAltName extension's OID (2.5.29.17).
const OID_SUBJECT_ALT_NAME: &[u8] = &[der::OID, 3, 0x55, 0x1d, 0x11];
/// DER of the subjectKeyIdentifier extension's OID (2.5.29.14).
const OID_SUBJECT_KEY_IDENTIFIER: &[u8] = &[der::OID, 3, 0x55, 0x1d, 0x0e];
/// The context tags of a certificate's `version` and `extensions` fields.
const VERSION_TAG: u8 = 0xa0;
const EXTENSIONS_TAG: u8 = 0xa3;
/// GeneralName `uniformResourceIdentifier` ([6] IMPLICIT IA5String).
const URI_TAG: u8 = 0x86;

/// One extension of the leaf template.
enum LeafExtension {
    /// The same in every leaf (authority key identifier, key usages, CRL distribution point,
    /// basic constraints): its whole DER.
    Fixed(Vec<u8>),
    /// The SPIFFE ID as the one URI SAN.
    SubjectAltName,
    /// The subject key identifier: as rcgen derives it, the first 20 bytes of the SHA-256 of
    /// the subjectPublicKeyInfo.
    SubjectKeyIdentifier,
}

/// A leaf certificate's to-be-signed part, in the pieces every leaf shares.
#[derive(Default)]
struct LeafTemplate {
    /// The `version` field.
    version: Vec<u8>,
    /// The `signature` algorithm and `issuer` fields, between serial and validity.
    algorithm_and_issuer: Vec<u8>,
    /// The `subject` field.
    subject: Vec<u8>,
    /// The extensions, in order.
    extensions: Vec<LeafExtension>,
    /// The certificate's `signatureAlgorithm`.
    algorithm: Vec<u8>,
}

impl LeafTemplate {
    /// Splits a leaf encoded by rcgen. `None` if it is not shaped as expected.
    fn parse(cert: &[u8]) -> Option<Self> {
        let (der::SEQUENCE, _, body) = der::element(cert)? else {
            return None;
        };
        let [tbs, algorithm, _signature] = der::elements(&cert[body])?[..] else {
            return None;
        };
        let (der::SEQUENCE, _, body) = der::element(tbs)? else {
            return None;
        };
        let [
            version,
            _serial,
            signature,
            issuer,
            _validity,
            subject,
            _key,
            extensions,
        ] = der::elements(&tbs[body])?[..]
        else {
            return None;
        };
        if version.first() != Some(&VERSION_TAG) || signature != algorithm {
            return None;
        }
        let (EXTENSIONS_TAG, _, body) = der::element(extensions)? else {
            return None;
        };
        let list = &extensions[body];
        let (der::SEQUENCE, _, body) = der::element(list)? else {
            return None;
        };
        let mut parsed = Vec::new();
        for ext in der::elements(&list[body])? {
            let (_, _, body) = der::element(ext)?;
            let (der::OID, oid_len, _) = der::element(&ext[body.clone()])? else {
                return None;
            };
            // The two rewritten per leaf are written non-critical: extnID and extnValue only.
            let rewritten = der::elements(&ext[body.clone()])?.len() == 2;
            parsed.push(match &ext[body.start..body.start + oid_len] {
                OID_SUBJECT_ALT_NAME if rewritten => LeafExtension::SubjectAltName,
                OID_SUBJECT_KEY_IDENTIFIER if rewritten => LeafExtension::SubjectKeyIdentifier,
                OID_SUBJECT_ALT_NAME | OID_SUBJECT_KEY_IDENTIFIER => return None,
                _ => LeafExtension::Fixed(ext.to_vec()),
            });
        }
        let count = |f: fn(&LeafExtension) -> bool| parsed.iter().filter(|e| f(e)).count();
        if count(|e| matches!(e, LeafExtension::SubjectAltName)) != 1
            || count(|e| matches!(e, LeafExtension::SubjectKeyIdentifier)) != 1
        {
            return None;
        }
        Some(Self {
            version: version.to_vec(),
            algorithm_and_issuer: [signature, issuer].concat(),
            subject: subject.to_vec(),
            extensions: parsed,
            algorithm: algorithm.to_vec(),
        })
    }

    /// The to-be-signed certificate for one leaf. `spki` is the subject's DER
    /// subjectPublicKeyInfo, `uri` its SPIFFE ID (ASCII, as a validated SPIFFE ID is).
    fn tbs(&self, serial: &Serial, validity: [i64; 2], uri: &str, spki: &[u8]) -> Vec<u8> {
        let fixed: usize = self
            .extensions
            .iter()
            .map(|e| match e {
                LeafExtension::Fixed(b) => b.len(),
                _ => 0,
            })
            .sum();
        let mut exts = Vec::with_capacity(fixed + uri.len() + 64);
        let mut value = Vec::with_capacity(uri.len() + 8);
        for ext in &self.extensions {
            let oid = match ext {
                LeafExtension::Fixed(b) => {
                    exts.extend_from_slice(b);
                    continue;
                }
                LeafExtension::SubjectAltName => {
                    value.clear();
                    der::header(&mut value, der::SEQUENCE, der::size(uri.len()));
                    der::tlv(&mut value, URI_TAG, uri.as_bytes());
                    OID_SUBJECT_ALT_NAME
                }
                LeafExtension::SubjectKeyIdentifier => {
                    let digest = ring::digest::digest(&ring::digest::SHA256, spki);
                    value.clear();
                    der::tlv(&mut value, der::OCTET_STRING, &digest.as_ref()[..20]);
                    OID_SUBJECT_KEY_IDENTIFIER
                }
            };
            // Extension ::= SEQUENCE { extnID, extnValue OCTET STRING } (not critical).
            der::header(&mut exts, der::SEQUENCE, oid.len() + der::size(value.len()));
            exts.extend_from_slice(oid);
            der::tlv(&mut exts, der::OCTET_STRING, &value);
        }

        let mut content = Vec::with_capacity(
            self.version.len()
                + self.algorithm_and_issuer.len()
                + self.subject.len()
                + spki.len()
                + exts.len()
                + 64,
        );
        content.extend_from_slice(&self.version);
        der::integer(&mut content, serial.bytes());
        content.extend_from_slice(&self.algorithm_and_issuer);
        let mut times = Vec::with_capacity(36);
        der::time(&mut times, validity[0]);
        der::time(&mut times, validity[1]);
        der::tlv(&mut content, der::SEQUENCE, &times);
        content.extend_from_slice(&self.subject);
        content.extend_from_slice(spki);
        der::header(&mut content, EXTENSIONS_TAG, der::size(exts.len()));
        der::tlv(&mut content, der::SEQUENCE, &exts);
        let mut tbs = Vec::with_capacity(content.len() + 4);
        der::tlv(&mut tbs, der::SEQUENCE, &content);
        tbs
    }
}

/// A P-256 key pair made with ring: its public key and its PKCS#8 DER. The public point is read
/// from the document ring returns, rather than derived from the private key again.
fn generate_p256(rng: &SystemRandom) -> Result<(CsrKey, Secret<Vec<u8>>), MintError> {
    let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, rng)
        .map_err(|_| MintError::Signing("key generation failed".into()))?;
    let point = pkcs8_ec_public_key(doc.as_ref())
        .ok_or_else(|| MintError::Signing("unexpected PKCS#8 encoding".into()))?;
    Ok((
        CsrKey {
            raw: point.to_vec(),
            alg: &PKCS_ECDSA_P256_SHA256,
        },
        Secret::new(doc.as_ref().to_vec()),
    ))
}

/// The uncompressed P-256 public point of a PKCS#8 EC private key: the `[1] publicKey` of the
/// ECPrivateKey (RFC 5915) inside the PrivateKeyInfo (RFC 5208).
fn pkcs8_ec_public_key(doc: &[u8]) -> Option<&[u8]> {
    let (der::SEQUENCE, _, body) = der::element(doc)? else {
        return None;
    };
    let [_version, _algorithm, private_key, ..] = der::elements(&doc[body])?[..] else {
        return None;
    };
    let (der::OCTET_STRING, _, body) = der::element(private_key)? else {
        return None;
    };
    let ec = &private_key[body];
    let (der::SEQUENCE, _, body) = der::element(ec)? else {
        return None;
    };
    let public = der::elements(&ec[body])?
        .into_iter()
        .find(|f| f.first() == Some(&0xa1))?;
    let (_, _, body) = der::element(public)?;
    let bits = &public[body];
    let (der::BIT_STRING, _, body) = der::element(bits)? else {
        return None;
    };
    let point = bits[body].strip_prefix(&[0])?;
    (point.len() == 65 && point[0] == 4).then_some(point)
}

impl X509Minter {
    /// A minter signing with the intermediate CA; `crl_url` goes into every leaf's CRL
    /// distribution point.
    pub fn new(
        intermediate_der: Vec<u8>,
        intermediate_key: KeyPair,
        ca_not_after: SystemTime,
        crl_url: Option<String>,
    ) -> Result<Self, MintError> {
        let issuer =
            Issuer::from_ca_cert_der(&intermediate_der.as_slice().into(), intermediate_key)
                .map_err(|e| MintError::Signing(e.to_string()))?;
        let mut minter = Self {
            issuer,
            leaf: LeafTemplate::default(),
            intermediate_der,
            ca_not_after,
            crl_url,
            rng: SystemRandom::new(),
        };
        minter.leaf = minter.leaf_template()?;
        Ok(minter)
    }

    /// Encodes a leaf with rcgen once, for a placeholder key and SPIFFE ID, and keeps its
    /// to-be-signed part in pieces: every leaf differs from it only in serial, validity, key,
    /// SAN and subject key identifier.
    fn leaf_template(&self) -> Result<LeafTemplate, MintError> {
        // Any validity inside the CA's does (every mint writes its own), so a broker whose CA
        // has expired still starts, and refuses mints with `CaExpired`.
        let minute = Duration::from_secs(60);
        let not_after = self
            .ca_not_after
            .checked_sub(minute)
            .ok_or(MintError::CaExpired)?;
        let now = not_after.checked_sub(minute).ok_or(MintError::CaExpired)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| MintError::Signing(e.to_string()))?;
        let mut params = self.leaf_params(Serial([0x40; 16]), now, not_after)?;
        params.subject_alt_names = vec![SanType::URI(
            "spiffe://template.invalid/leaf"
                .try_into()
                .map_err(|e: rcgen::Error| MintError::Signing(e.to_string()))?,
        )];
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| MintError::Signing(e.to_string()))?;
        LeafTemplate::parse(cert.der())
            .ok_or_else(|| MintError::Signing("unexpected leaf certificate encoding".into()))
    }

    /// When the signing CA expires; no leaf may outlive it.
    pub fn ca_not_after(&self) -> SystemTime {
        self.ca_not_after
    }
    /// Signs a CRL listing `revoked`.
    pub fn crl(
        &self,
        revoked: &RevokedSet,
        number: u64,
        this_update: SystemTime,
        next_update: SystemTime,
    ) -> Result<Vec<u8>, MintError> {
        let params = rcgen::CertificateRevocationListParams {
            this_update: whole_secs(this_update).into(),
            next_update: whole_secs(next_update).into(),
            crl_number: {
                let be = number.to_be_bytes();
                let first = be.iter().position(|b| *b != 0).unwrap_or(be.len() - 1);
                SerialNumber::from_slice(&be[first..])
            },
            issuing_distribution_point: None,
            revoked_certs: Vec::new(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        let template = params
            .signed_by(&self.issuer)
            .map_err(|e| MintError::Signing(format!("crl: {e}")))?;
        super::crl::assemble(template.der(), &revoked.encode_entries(), |tbs| {
            self.issuer
                .key()
                .sign(tbs)
                .map_err(|e| MintError::Signing(format!("crl: {e}")))
        })
    }

    /// The intermediate's certificate (DER).
    pub fn intermediate_der(&self) -> &[u8] {
        &self.intermediate_der
    }

    /// A leaf may be valid from `now` until `not_after` only within the CA's own validity.
    fn check_validity(&self, now: SystemTime, not_after: SystemTime) -> Result<(), MintError> {
        if not_after <= now || not_after > self.ca_not_after {
            return Err(MintError::CaExpired);
        }
        Ok(())
    }

    fn leaf_params(
        &self,
        serial: Serial,
        now: SystemTime,
        not_after: SystemTime,
    ) -> Result<CertificateParams, MintError> {
        self.check_validity(now, not_after)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "SPIFFE");
        params.distinguished_name = dn;
        params.serial_number = Some(SerialNumber::from_slice(serial.bytes()));
        params.not_before = whole_secs(now - BACKDATE).into();
        params.not_after = whole_secs(not_after).into();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        if let Some(url) = &self.crl_url {
            params.crl_distribution_points = vec![CrlDistributionPoint {
                uris: vec![url.clone()],
            }];
        }
        Ok(params)
    }

    /// Mints an X.509-SVID for `id`, valid until `not_after` (already clamped by the caller).
    ///
    /// The certificate is the one rcgen encodes for [`Self::leaf_params`] (a test checks it
    /// byte for byte), written from the pre-encoded template: this runs for every X.509-SVID.
    pub fn mint(
        &self,
        id: &SpiffeId,
        key: SubjectKey,
        now: SystemTime,
        not_after: SystemTime,
    ) -> Result<X509Svid, MintError> {
        self.check_validity(now, not_after)?;
        let serial = Serial::new(&self.rng, now)?;
        let (public, private_key) = match key {
            SubjectKey::Csr(k) => (k, None),
            SubjectKey::Generate => {
                let (public, pkcs8) = generate_p256(&self.rng)?;
                (public, Some(pkcs8))
            }
        };
        let tbs = self.leaf.tbs(
            &serial,
            [unix_secs(now - BACKDATE), unix_secs(not_after)],
            id.as_str(),
            &public.subject_public_key_info(),
        );
        let signature = self
            .issuer
            .key()
            .sign(&tbs)
            .map_err(|e| MintError::Signing(e.to_string()))?;
        Ok(X509Svid {
            cert_chain: vec![
                der::signed(tbs, &self.leaf.algorithm, &signature),
                self.intermediate_der.clone(),
            ],
            private_key,
            serial,
            not_after: whole_secs(not_after),
        })
    }

    /// A serving certificate for the broker's own TLS listener, for `dns` names and `ips`, with
    /// the URI SAN `spiffe://<trust domain>/ephemera/broker`.
    pub fn serving_identity(
        &self,
        broker_id: &SpiffeId,
        dns: &[String],
        ips: &[IpAddr],
        now: SystemTime,
        ttl: Duration,
    ) -> Result<ServingIdentity, MintError> {
        let serial = Serial::new(&self.rng, now)?;
        let not_after = (now + ttl).min(self.ca_not_after);
        let mut params = self.leaf_params(serial, now, not_after)?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.crl_distribution_points.clear();
        let err = |e: rcgen::Error| MintError::Signing(e.to_string());
        let mut sans = vec![SanType::URI(broker_id.as_str().try_into().map_err(err)?)];
        for d in dns {
            sans.push(SanType::DnsName(d.as_str().try_into().map_err(err)?));
        }
        sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.subject_alt_names = sans;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(err)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(err)?;
        Ok(ServingIdentity {
            chain: vec![cert.der().to_vec(), self.intermediate_der.clone()],
            key: Secret::new(key.serialize_der()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, KeyPair};

    fn csr_der(params: &CertificateParams, key: &KeyPair) -> Vec<u8> {
        params.serialize_request(key).unwrap().der().to_vec()
    }

    #[test]
    fn csr_table() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let plain = csr_der(&CertificateParams::default(), &key);
        assert!(parse_csr(&plain).is_ok());
        let pem_text = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", plain.clone()));
        assert!(parse_csr(pem_text.as_bytes()).is_ok());

        // A CSR with SANs is accepted, but its SANs are never used.
        let with_sans = csr_der(
            &CertificateParams::new(vec!["evil.example.com".to_owned()]).unwrap(),
            &key,
        );
        assert!(parse_csr(&with_sans).is_ok());

        let mut ca_params = CertificateParams::default();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_csr = csr_der(&ca_params, &key);

        let mut tampered = plain.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 0x01;

        let p384 = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
        assert!(parse_csr(&csr_der(&CertificateParams::default(), &p384)).is_ok());

        type Check = fn(&MintError) -> bool;
        let rows: Vec<(&str, Vec<u8>, Check)> = vec![
            ("garbage", b"not a csr".to_vec(), |e| {
                matches!(e, MintError::CsrMalformed(_))
            }),
            (
                "empty pem",
                b"-----BEGIN CERTIFICATE REQUEST-----\n-----END CERTIFICATE REQUEST-----\n"
                    .to_vec(),
                |e| matches!(e, MintError::CsrMalformed(_)),
            ),
            (
                "wrong pem tag",
                pem::encode(&pem::Pem::new("CERTIFICATE", plain.clone())).into_bytes(),
                |e| matches!(e, MintError::CsrMalformed(_)),
            ),
            ("bad signature", tampered, |e| {
                matches!(e, MintError::CsrSignature)
            }),
            ("asks for CA", ca_csr, |e| {
                matches!(e, MintError::CsrRequestsCa)
            }),
            ("over 16 KiB", vec![0x30; MAX_CSR_BYTES + 1], |e| {
                matches!(e, MintError::CsrTooLarge { .. })
            }),
        ];
        for (what, input, check) in rows {
            match parse_csr(&input) {
                Err(e) => assert!(check(&e), "{what}: wrong error {e:?}"),
                Ok(_) => panic!("{what}: accepted"),
            }
        }
    }

    /// A minter on a new CA; `ca_not_after` overrides the CA's own expiry.
    fn minter(crl_url: Option<String>, ca_not_after: Option<SystemTime>) -> X509Minter {
        let dir = tempfile::tempdir().unwrap();
        let td: crate::id::TrustDomain = "example.org".parse().unwrap();
        super::super::keys::init(dir.path(), &td, Default::default(), SystemTime::now()).unwrap();
        let m = super::super::keys::load(dir.path(), &td).unwrap();
        X509Minter::new(
            m.intermediate_der,
            m.intermediate_key,
            ca_not_after.unwrap_or(m.intermediate_not_after),
            crl_url,
        )
        .unwrap()
    }

    #[test]
    fn leaves_are_the_certificates_rcgen_encodes() {
        let id: SpiffeId = "spiffe://example.org/ci/deploy/a-rather-long-path-segment-to-need-long-lengths-0123456789-0123456789-0123456789".parse().unwrap();
        let now = SystemTime::now();
        let not_after = now + Duration::from_secs(600);
        let mut subjects = Vec::new();
        for alg in [
            &PKCS_ECDSA_P256_SHA256,
            &PKCS_ECDSA_P384_SHA384,
            &PKCS_ED25519,
        ] {
            let key = KeyPair::generate_for(alg).unwrap();
            let csr = parse_csr(&csr_der(&CertificateParams::default(), &key)).unwrap();
            subjects.push(Some(csr));
        }
        subjects.push(None);
        for crl_url in [None, Some("https://broker.example.org:8443/crl".to_owned())] {
            let minter = minter(crl_url, None);
            for subject in &subjects {
                let key = subject
                    .clone()
                    .map_or(SubjectKey::Generate, SubjectKey::Csr);
                let svid = minter.mint(&id, key, now, not_after).unwrap();
                let (_, cert) = x509_parser::parse_x509_certificate(&svid.cert_chain[0]).unwrap();
                let public = subject.clone().unwrap_or_else(|| CsrKey {
                    raw: cert.public_key().subject_public_key.data.to_vec(),
                    alg: &PKCS_ECDSA_P256_SHA256,
                });

                // rcgen, given the same serial, times and key, encodes the same certificate.
                let mut params = minter.leaf_params(svid.serial, now, not_after).unwrap();
                params.subject_alt_names = vec![SanType::URI(id.as_str().try_into().unwrap())];
                let expected = params.signed_by(&public, &minter.issuer).unwrap();
                let (_, expected) = x509_parser::parse_x509_certificate(expected.der()).unwrap();
                assert_eq!(
                    cert.tbs_certificate.as_ref(),
                    expected.tbs_certificate.as_ref()
                );
                assert_eq!(cert.signature_algorithm, expected.signature_algorithm);

                let (_, intermediate) =
                    x509_parser::parse_x509_certificate(&svid.cert_chain[1]).unwrap();
                cert.verify_signature(Some(intermediate.public_key()))
                    .unwrap();
                assert_eq!(svid.private_key.is_some(), subject.is_none());
                if let Some(pkcs8) = &svid.private_key {
                    // The returned private key is the certificate's.
                    let pair = EcdsaKeyPair::from_pkcs8(
                        &ECDSA_P256_SHA256_ASN1_SIGNING,
                        pkcs8.expose(),
                        &SystemRandom::new(),
                    )
                    .unwrap();
                    assert_eq!(
                        ring::signature::KeyPair::public_key(&pair).as_ref(),
                        &cert.public_key().subject_public_key.data[..]
                    );
                }
            }
        }
    }

    #[test]
    fn an_expired_ca_loads_and_refuses_to_mint() {
        let now = SystemTime::now();
        let minter = minter(None, Some(now - Duration::from_secs(3600)));
        let id: SpiffeId = "spiffe://example.org/w".parse().unwrap();
        let err = minter
            .mint(
                &id,
                SubjectKey::Generate,
                now,
                now + Duration::from_secs(60),
            )
            .unwrap_err();
        assert_eq!(err, MintError::CaExpired);
    }

    #[test]
    fn pkcs8_public_keys() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        assert_eq!(
            pkcs8_ec_public_key(&key.serialize_der()),
            Some(key.public_key_raw())
        );
        let ed = KeyPair::generate_for(&PKCS_ED25519).unwrap();
        assert_eq!(pkcs8_ec_public_key(&ed.serialize_der()), None);
        assert_eq!(pkcs8_ec_public_key(b"\x30\x03\x02\x01\x00"), None);
        assert_eq!(pkcs8_ec_public_key(b""), None);
    }

    #[test]
    fn serials_are_positive_sixteen_bytes_distinct_and_in_issue_order() {
        let rng = SystemRandom::new();
        let now = SystemTime::now();
        let a = Serial::new(&rng, now).unwrap();
        let b = Serial::new(&rng, now).unwrap();
        let later = Serial::new(&rng, now + Duration::from_micros(1)).unwrap();
        let much_later = Serial::new(&rng, now + Duration::from_secs(86_400 * 365)).unwrap();
        // Issued in the same microsecond: only the random half tells them apart.
        assert_eq!(a.bytes()[..8], b.bytes()[..8]);
        assert_ne!(a.bytes()[8..], b.bytes()[8..]);
        assert!(a.max(b) < later && later < much_later);
        for s in [a, b, later, much_later] {
            assert_eq!(s.bytes()[0], 0x40);
            assert_eq!(s.to_string().len(), 32);
            // The DER INTEGER is positive and exactly 16 bytes, as x509-parser reads it.
            let mut der = Vec::new();
            super::der::integer(&mut der, s.bytes());
            let (_, parsed) = x509_parser::der_parser::der::parse_der_integer(&der).unwrap();
            assert_eq!(parsed.as_slice().unwrap(), s.bytes());
        }
        let micros =
            |s: Serial| u64::from_be_bytes(s.bytes()[..8].try_into().unwrap()) & !(0x40u64 << 56);
        assert_eq!(micros(later) - micros(a), 1);
        assert_eq!(
            u128::from(micros(a)),
            now.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_micros()
        );
    }
}
