//! The CA's keys over time, the parts that touch no store: the schedule's settings, the
//! key-encryption key that wraps private keys for the store, new key material (a JWT key, an
//! intermediate signed by the online root or a CSR for the offline one, a new root), and the
//! root's machine's part (`ephemera ca sign-intermediate`, `ephemera ca new-root`).
//!
//! The schedule is SPIRE's: a key of lifetime `L` gets a successor at half its life (prepared:
//! published, not signing), the successor becomes active at `L/6` before the key's end, and the
//! old key is retired: published until its own end, which no credential it signed outlives.
//! `lease::keys` keeps the keys in the store and moves them along it.

use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, Issuer, KeyPair, PKCS_ECDSA_P256_SHA256};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

use super::jwt::EcPublicJwk;
use super::keys::{self, CaError};
use crate::id::TrustDomain;
use crate::secret::Secret;

/// Default intermediate lifetime when the broker signs its own (root online).
pub const DEFAULT_INTERMEDIATE_TTL: Duration = Duration::from_secs(365 * 86_400);
/// Default JWT key lifetime.
pub const DEFAULT_JWT_KEY_TTL: Duration = Duration::from_secs(30 * 86_400);
/// The longest `spiffe_refresh_hint` (and `Cache-Control: max-age` of `/keys` and `/bundle`).
pub const MAX_REFRESH_HINT: Duration = Duration::from_secs(3600);

/// How the CA's keys are scheduled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaSettings {
    /// Lifetime of a root the broker makes itself (root online).
    pub root_ttl: Duration,
    /// Lifetime of an intermediate the broker signs itself.
    pub intermediate_ttl: Duration,
    /// Lifetime of a JWT key.
    pub jwt_key_ttl: Duration,
    /// Whether the broker holds the root key and signs its next intermediates.
    pub root_online: bool,
}

impl Default for CaSettings {
    fn default() -> Self {
        Self {
            root_ttl: keys::DEFAULT_ROOT_TTL,
            intermediate_ttl: DEFAULT_INTERMEDIATE_TTL,
            jwt_key_ttl: DEFAULT_JWT_KEY_TTL,
            root_online: false,
        }
    }
}

impl CaSettings {
    /// How often relying parties should refetch keys: a thirtieth of the shorter key lifetime
    /// (so well inside the third of its life a successor is published before it signs),
    /// between one second and [`MAX_REFRESH_HINT`].
    pub fn refresh_hint(&self) -> Duration {
        (self.intermediate_ttl.min(self.jwt_key_ttl) / 30)
            .clamp(Duration::from_secs(1), MAX_REFRESH_HINT)
    }
}

/// Whole seconds of a duration.
pub fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

/// The time `unix` seconds after the epoch.
pub fn at(unix: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(unix).unwrap_or(0))
}

/// The key-encryption key: AES-256-GCM, from the data directory's `key-wrap.key`.
pub struct Kek {
    key: LessSafeKey,
    rng: SystemRandom,
}

impl Kek {
    /// Reads `path`, creating it (32 random bytes, mode 0600) if it is missing.
    pub fn load_or_create(path: &Path) -> Result<Self, CaError> {
        let secret = keys::load_or_create_secret(path)?;
        let digest = ring::digest::digest(&ring::digest::SHA256, secret.expose());
        let key = UnboundKey::new(&AES_256_GCM, digest.as_ref())
            .map_err(|_| CaError::Generate("key-encryption key rejected".into()))?;
        Ok(Self {
            key: LessSafeKey::new(key),
            rng: SystemRandom::new(),
        })
    }

    /// Wraps a PKCS#8 key for the key `id`: nonce, then ciphertext and tag.
    pub fn wrap(&self, id: &str, pkcs8: &[u8]) -> Result<Vec<u8>, CaError> {
        let mut nonce = [0u8; 12];
        self.rng
            .fill(&mut nonce)
            .map_err(|_| CaError::Generate("random number generator failed".into()))?;
        let mut sealed = pkcs8.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(id.as_bytes()),
                &mut sealed,
            )
            .map_err(|_| CaError::Generate("wrapping a key failed".into()))?;
        let mut out = nonce.to_vec();
        out.extend(sealed);
        Ok(out)
    }

    /// Unwraps the key `id`; `None` if this key-encryption key did not wrap it.
    pub fn unwrap(&self, id: &str, wrapped: &[u8]) -> Option<Secret<Vec<u8>>> {
        let (nonce, sealed) = wrapped.split_at_checked(12)?;
        let mut buf = sealed.to_vec();
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(id.as_bytes()), &mut buf)
            .ok()?;
        Some(Secret::new(plain.to_vec()))
    }
}

/// The online root: signs the next intermediates.
pub struct RootSigner {
    issuer: Issuer<'static, KeyPair>,
    not_after: i64,
}

impl RootSigner {
    /// The root's end of validity, Unix seconds: no intermediate outlives it.
    pub fn not_after(&self) -> i64 {
        self.not_after
    }
}

impl RootSigner {
    /// A root from its certificate and private key (PKCS#8).
    pub fn new(cert_der: &[u8], pkcs8: &[u8]) -> Result<Self, CaError> {
        let key = KeyPair::try_from(pkcs8).map_err(generate_err)?;
        let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
            .map_err(|e| CaError::Generate(e.to_string()))?;
        let not_after = cert.validity().not_after.timestamp();
        let issuer = Issuer::from_ca_cert_der(&cert_der.into(), key).map_err(generate_err)?;
        Ok(Self { issuer, not_after })
    }
}

/// The root key from the data directory (PKCS#8) and the root's certificate (DER), for
/// `root_key = "online"` and the root's machine.
pub fn read_root(dir: &crate::datadir::DataDir) -> Result<(Vec<u8>, Secret<Vec<u8>>), CaError> {
    let path = dir.root_key();
    if !path.exists() {
        return Err(CaError::Invalid {
            reason: "missing: [ca] root_key = \"online\" needs the root key here; put it back, \
                     or set root_key = \"offline\" and stage intermediates signed on the \
                     root's machine"
                .into(),
            path,
        });
    }
    keys::check_key_mode(&path)?;
    let key_der = Secret::new(keys::read_pem(&path, "PRIVATE KEY")?);
    let cert_der = keys::read_pem(&dir.root_cert(), "CERTIFICATE")?;
    Ok((cert_der, key_der))
}

/// The root key from the data directory, for `root_key = "online"`.
pub fn load_root(dir: &crate::datadir::DataDir) -> Result<RootSigner, CaError> {
    let (cert_der, key_der) = read_root(dir)?;
    RootSigner::new(&cert_der, key_der.expose()).map_err(|e| CaError::Invalid {
        path: dir.root_key(),
        reason: e.to_string(),
    })
}

/// `ephemera ca sign-intermediate`: signs the CSR of a pending intermediate with the root in
/// `root_dir` (on the root's machine), valid for `ttl` (capped at the root's end). Only the
/// CSR's public key is used; the certificate is the one the broker would make itself.
pub fn sign_intermediate(
    root_dir: &Path,
    csr_pem: &str,
    ttl: Duration,
    now: SystemTime,
) -> Result<String, CaError> {
    let dir = crate::datadir::DataDir::new(root_dir);
    let invalid = |reason: String| CaError::Invalid {
        path: std::path::PathBuf::from("CSR"),
        reason,
    };
    let root = load_root(&dir)?;
    let csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| invalid(format!("not a valid CSR: {e}")))?;
    let root_der = keys::read_pem(&dir.root_cert(), "CERTIFICATE")?;
    let td = keys::trust_domain_of(&dir.root_cert(), &root_der)?;
    let not_before = now - Duration::from_secs(60);
    let not_after = (now + ttl).min(at(root.not_after));
    let params: CertificateParams =
        keys::ca_params(&td, "Ephemera Intermediate CA", 0, not_before, not_after)?;
    let signed = rcgen::CertificateSigningRequestParams {
        params,
        public_key: csr.public_key,
    }
    .signed_by(&root.issuer)
    .map_err(|e| CaError::Generate(e.to_string()))?;
    Ok(signed.pem())
}

/// Whether the certificate `cert_der` is signed by the key of the certificate `issuer_der`.
pub fn signed_by(cert_der: &[u8], issuer_der: &[u8]) -> bool {
    let (Ok((_, cert)), Ok((_, issuer))) = (
        x509_parser::parse_x509_certificate(cert_der),
        x509_parser::parse_x509_certificate(issuer_der),
    ) else {
        return false;
    };
    cert.verify_signature(Some(issuer.public_key())).is_ok()
}

/// Key material for a new signing key, before it is wrapped and stored.
pub struct NewKey {
    /// The RFC 7638 thumbprint of its public key.
    pub id: String,
    /// The certificate (an intermediate the online root signed), the CSR (an intermediate
    /// awaiting the offline root) or the public point (a JWT key).
    pub public: Vec<u8>,
    /// Whether it awaits the offline root's signature (`public` is a CSR).
    pub pending: bool,
    /// The private key, PKCS#8.
    pub pkcs8: Secret<Vec<u8>>,
    /// Validity, Unix seconds.
    pub not_before: i64,
    /// End of validity, Unix seconds.
    pub not_after: i64,
}

fn generate_err(e: rcgen::Error) -> CaError {
    CaError::Generate(e.to_string())
}

/// A new P-256 key pair and its id.
fn new_key_pair() -> Result<(KeyPair, String), CaError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate_err)?;
    let id = EcPublicJwk::from_uncompressed(key.public_key_raw())
        .map(|j| j.thumbprint())
        .ok_or_else(|| CaError::Generate("generated key is not P-256".into()))?;
    Ok((key, id))
}

/// A new JWT signing key valid from `now` for `ttl`.
pub fn new_jwt_key(now: i64, ttl: Duration) -> Result<NewKey, CaError> {
    let (key, id) = new_key_pair()?;
    Ok(NewKey {
        id,
        public: key.public_key_raw().to_vec(),
        pending: false,
        pkcs8: Secret::new(key.serialize_der()),
        not_before: now,
        not_after: now + secs(ttl),
    })
}

/// A new self-signed root valid from `now` for `ttl`.
pub fn new_root(trust_domain: &TrustDomain, now: i64, ttl: Duration) -> Result<NewKey, CaError> {
    let (key, id) = new_key_pair()?;
    let not_before = now - secs(ttl / 60).clamp(1, 60);
    let not_after = now + secs(ttl);
    let params = keys::ca_params(
        trust_domain,
        "Ephemera Root CA",
        1,
        at(not_before),
        at(not_after),
    )?;
    let cert = params.self_signed(&key).map_err(generate_err)?;
    Ok(NewKey {
        id,
        public: cert.der().to_vec(),
        pending: false,
        pkcs8: Secret::new(key.serialize_der()),
        not_before,
        not_after,
    })
}

/// `ephemera ca new-root`: a new root's certificate and key written to `dir` (on the root's
/// machine), which must not hold a root yet. Returns the certificate (PEM), to stage.
pub fn new_root_files(
    dir: &Path,
    trust_domain: &TrustDomain,
    ttl: Duration,
    now: SystemTime,
) -> Result<String, CaError> {
    let d = crate::datadir::DataDir::new(dir);
    for path in [d.root_cert(), d.root_key()] {
        if path.exists() {
            return Err(CaError::AlreadyInitialized {
                dir: dir.to_owned(),
            });
        }
    }
    keys::create_data_dir(dir)?;
    let root = new_root(trust_domain, crate::clock::unix_secs(now), ttl)?;
    let cert_pem = pem::encode(&pem::Pem::new("CERTIFICATE", root.public));
    let key_pem = pem::encode(&pem::Pem::new("PRIVATE KEY", root.pkcs8.expose().clone()));
    keys::write_new(&d.root_key(), key_pem.as_bytes(), 0o600)?;
    keys::write_new(&d.root_cert(), cert_pem.as_bytes(), 0o644)?;
    Ok(cert_pem)
}

/// A new intermediate valid from `now` for `ttl`: signed by `root` when it is online (and
/// ending no later than it), else a CSR for the offline root to sign.
pub fn new_intermediate(
    trust_domain: &TrustDomain,
    root: Option<&RootSigner>,
    now: i64,
    ttl: Duration,
) -> Result<NewKey, CaError> {
    let (key, id) = new_key_pair()?;
    // Backdated for clock skew, by a minute at most: the schedule counts from `notBefore`.
    let not_before = now - secs(ttl / 60).clamp(1, 60);
    let mut not_after = now + secs(ttl);
    if let Some(r) = root {
        not_after = not_after.min(r.not_after);
    }
    let params = keys::ca_params(
        trust_domain,
        "Ephemera Intermediate CA",
        0,
        at(not_before),
        at(not_after),
    )?;
    let (public, pending) = match root {
        Some(r) => (
            params
                .signed_by(&key, &r.issuer)
                .map_err(generate_err)?
                .der()
                .to_vec(),
            false,
        ),
        None => (
            params
                .serialize_request(&key)
                .map_err(generate_err)?
                .der()
                .to_vec(),
            true,
        ),
    };
    Ok(NewKey {
        id,
        public,
        pending,
        pkcs8: Secret::new(key.serialize_der()),
        not_before,
        not_after,
    })
}
