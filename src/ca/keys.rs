//! The CA's files in the data directory: creating them (`ephemera ca init`, dev mode) and loading
//! them at start.
//!
//! Private keys are written mode 0600 and the broker refuses to start when any key file is
//! readable by group or others. The root key is only needed to create the intermediate: an
//! operator may move `root-ca.key` offline after `ca init`; the broker runs without it.

use std::fs::{DirBuilder, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, IsCa, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};

use crate::id::TrustDomain;
use crate::secret::Secret;
use ring::rand::SecureRandom;

pub use crate::datadir::{
    BUNDLE, INTERMEDIATE_CERT, INTERMEDIATE_KEY, JWT_KEY, ROOT_CERT, ROOT_KEY,
};

/// How long `ca init` makes the root valid by default: 10 years.
pub const DEFAULT_ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 86_400);
/// How long `ca init` makes the intermediate valid by default: 1 year.
pub const DEFAULT_INTERMEDIATE_TTL: Duration = Duration::from_secs(365 * 86_400);

/// Why CA files could not be created or used.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// `ca init` found CA files already present.
    #[error("a CA already exists in {}: refusing to overwrite it", dir.display())]
    AlreadyInitialized {
        /// The data directory.
        dir: PathBuf,
    },
    /// The data directory has no CA.
    #[error(
        "no CA in {}: create one with `ephemera ca init --data-dir {} --trust-domain <name>`",
        dir.display(), dir.display()
    )]
    NotInitialized {
        /// The data directory.
        dir: PathBuf,
    },
    /// A key file is readable by group or others.
    #[error(
        "key file {} has mode {mode:04o} and is readable by group or others; fix it with `chmod 600 {}`",
        path.display(), path.display()
    )]
    KeyFileMode {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A file does not hold what it should.
    #[error("{}: {reason}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The CA belongs to another trust domain than configured.
    #[error(
        "{} is for trust domain {found:?} but the broker is configured for {expected:?}",
        path.display()
    )]
    TrustDomainMismatch {
        /// The certificate file.
        path: PathBuf,
        /// Trust domain in the certificate.
        found: String,
        /// Configured trust domain.
        expected: String,
    },
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Generate(String),
}

fn generate_err(e: rcgen::Error) -> CaError {
    CaError::Generate(e.to_string())
}

/// Lifetimes for `ca init`.
#[derive(Debug, Clone, Copy)]
pub struct InitOptions {
    /// Root CA lifetime.
    pub root_ttl: Duration,
    /// Intermediate CA lifetime (capped at the root's).
    pub intermediate_ttl: Duration,
}

impl Default for InitOptions {
    fn default() -> Self {
        Self {
            root_ttl: DEFAULT_ROOT_TTL,
            intermediate_ttl: DEFAULT_INTERMEDIATE_TTL,
        }
    }
}

/// The CA material the broker runs with.
pub struct CaMaterial {
    /// Root certificate (DER): the trust anchor.
    pub root_der: Vec<u8>,
    /// Intermediate certificate (DER).
    pub intermediate_der: Vec<u8>,
    /// Intermediate private key.
    pub intermediate_key: KeyPair,
    /// The intermediate's notAfter.
    pub intermediate_not_after: SystemTime,
    /// JWT signing key, PKCS#8 DER.
    pub jwt_pkcs8: Secret<Vec<u8>>,
}

/// One signing key or trust anchor of a data directory, as `ephemera ca status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyStatus {
    /// `x509-root`, `x509-intermediate` or `jwt`.
    pub kind: &'static str,
    /// The certificate's serial (lowercase hex), or the JWT key's `kid`.
    pub id: String,
    /// Validity, Unix seconds (`None` for a key without one: the JWT key).
    pub not_before: Option<i64>,
    /// End of validity, Unix seconds.
    pub not_after: Option<i64>,
    /// Whether the private key is in the directory (the root's should not be).
    pub key_present: bool,
}

/// The CA's keys in `dir`: the root, the intermediate and the JWT key, read from their files
/// (the private keys are only parsed to name the JWT key).
pub fn status(dir: &Path) -> Result<Vec<KeyStatus>, CaError> {
    if !exists(dir) {
        return Err(CaError::NotInitialized {
            dir: dir.to_owned(),
        });
    }
    let mut out = Vec::new();
    for (kind, cert, key) in [
        ("x509-root", ROOT_CERT, ROOT_KEY),
        ("x509-intermediate", INTERMEDIATE_CERT, INTERMEDIATE_KEY),
    ] {
        let path = dir.join(cert);
        let der = read_pem(&path, "CERTIFICATE")?;
        let (_, c) = x509_parser::parse_x509_certificate(&der).map_err(|e| CaError::Invalid {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        out.push(KeyStatus {
            kind,
            id: c.raw_serial().iter().map(|b| format!("{b:02x}")).collect(),
            not_before: Some(c.validity().not_before.timestamp()),
            not_after: Some(c.validity().not_after.timestamp()),
            key_present: dir.join(key).exists(),
        });
    }
    let jwt_path = dir.join(JWT_KEY);
    check_key_mode(&jwt_path)?;
    let signer = crate::ca::jwt::JwtSigner::from_pkcs8(&read_pem(&jwt_path, "PRIVATE KEY")?, None)
        .map_err(|e| CaError::Invalid {
            path: jwt_path.clone(),
            reason: e.to_string(),
        })?;
    out.push(KeyStatus {
        kind: "jwt",
        id: signer.kid().to_owned(),
        not_before: None,
        not_after: None,
        key_present: true,
    });
    Ok(out)
}

/// Reads the 32-byte secret at `path`, creating it (random, mode 0600) if it does not exist.
/// Replicas that serve one Admin API behind a load balancer share it, like the CA files.
pub fn load_or_create_secret(path: &Path) -> Result<crate::secret::Secret<Vec<u8>>, CaError> {
    let io = |source| CaError::Io {
        path: path.to_owned(),
        source,
    };
    if !path.exists() {
        let mut bytes = [0u8; 32];
        ring::rand::SystemRandom::new()
            .fill(&mut bytes)
            .map_err(|_| CaError::Generate("random number generator failed".into()))?;
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(mut f) => f.write_all(&bytes).map_err(io)?,
            // Another broker on this data directory created it first: read theirs.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io(e)),
        }
    }
    check_key_mode(path)?;
    let secret = std::fs::read(path).map_err(io)?;
    if secret.len() < 32 {
        return Err(CaError::Invalid {
            path: path.to_owned(),
            reason: format!("{} bytes; the secret must be at least 32", secret.len()),
        });
    }
    Ok(crate::secret::Secret::new(secret))
}

/// Whether `dir` holds a CA (its intermediate certificate).
pub fn exists(dir: &Path) -> bool {
    dir.join(INTERMEDIATE_CERT).exists()
}

/// Creates `dir` (mode 0700) if it is missing.
pub fn create_data_dir(dir: &Path) -> Result<(), CaError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| CaError::Io {
            path: dir.to_owned(),
            source,
        })
}

/// The parameters of a root (`path_len` 1) or intermediate (0) CA certificate.
pub(crate) fn ca_params(
    trust_domain: &TrustDomain,
    common_name: &str,
    path_len: u8,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain.as_str());
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.subject_alt_names = vec![SanType::URI(
        trust_domain.id_uri().try_into().map_err(generate_err)?,
    )];
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    Ok(params)
}

/// Creates a root CA, an intermediate CA and a JWT signing key in `dir`.
///
/// Everything is generated in memory first; files are then created with `create_new`, so an
/// existing CA is never overwritten.
pub fn init(
    dir: &Path,
    trust_domain: &TrustDomain,
    opts: InitOptions,
    now: SystemTime,
) -> Result<(), CaError> {
    if [
        ROOT_CERT,
        ROOT_KEY,
        INTERMEDIATE_CERT,
        INTERMEDIATE_KEY,
        JWT_KEY,
    ]
    .iter()
    .any(|f| dir.join(f).exists())
    {
        return Err(CaError::AlreadyInitialized {
            dir: dir.to_owned(),
        });
    }
    create_data_dir(dir)?;
    let not_before = now - Duration::from_secs(60);
    let root_not_after = now + opts.root_ttl;
    let root_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate_err)?;
    let root = CertifiedIssuer::self_signed(
        ca_params(
            trust_domain,
            "Ephemera Root CA",
            1,
            not_before,
            root_not_after,
        )?,
        root_key,
    )
    .map_err(generate_err)?;
    let inter_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate_err)?;
    let inter_params = ca_params(
        trust_domain,
        "Ephemera Intermediate CA",
        0,
        not_before,
        (now + opts.intermediate_ttl).min(root_not_after),
    )?;
    let inter = inter_params
        .signed_by(&inter_key, &root)
        .map_err(generate_err)?;
    let jwt_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate_err)?;

    write_new(&dir.join(ROOT_CERT), root.pem().as_bytes(), 0o644)?;
    write_new(&dir.join(BUNDLE), root.pem().as_bytes(), 0o644)?;
    write_new(
        &dir.join(ROOT_KEY),
        root.key().serialize_pem().as_bytes(),
        0o600,
    )?;
    write_new(&dir.join(INTERMEDIATE_CERT), inter.pem().as_bytes(), 0o644)?;
    write_new(
        &dir.join(INTERMEDIATE_KEY),
        inter_key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_new(
        &dir.join(JWT_KEY),
        jwt_key.serialize_pem().as_bytes(),
        0o600,
    )?;
    // The key-encryption key the store's signing keys are wrapped with: made here so replicas
    // given copies of this directory share it.
    load_or_create_secret(&dir.join(crate::datadir::KEY_WRAP))?;
    Ok(())
}

/// Writes a new file with `mode`; fails if it exists.
pub fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    let io = |source| CaError::Io {
        path: path.to_owned(),
        source,
    };
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    f.write_all(contents).map_err(io)?;
    f.sync_all().map_err(io)
}

/// Refuses a key file that group or others may read or write.
pub fn check_key_mode(path: &Path) -> Result<(), CaError> {
    let meta = std::fs::metadata(path).map_err(|source| CaError::Io {
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(CaError::KeyFileMode {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// The contents of the one PEM block of `path`, which must be a `tag` block.
pub(crate) fn read_pem(path: &Path, tag: &str) -> Result<Vec<u8>, CaError> {
    let text = std::fs::read(path).map_err(|source| CaError::Io {
        path: path.to_owned(),
        source,
    })?;
    let p = pem::parse(&text).map_err(|e| CaError::Invalid {
        path: path.to_owned(),
        reason: format!("not PEM: {e}"),
    })?;
    if p.tag() != tag {
        return Err(CaError::Invalid {
            path: path.to_owned(),
            reason: format!("expected a {tag} PEM block, found {}", p.tag()),
        });
    }
    Ok(p.into_contents())
}

/// The trust domain named by a CA certificate's URI SAN, and its notAfter.
fn inspect_ca_cert(path: &Path, der: &[u8]) -> Result<(Option<String>, SystemTime), CaError> {
    let invalid = |reason: String| CaError::Invalid {
        path: path.to_owned(),
        reason,
    };
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| invalid(format!("not an X.509 certificate: {e}")))?;
    if !cert.is_ca() {
        return Err(invalid("not a CA certificate".into()));
    }
    let td = cert
        .subject_alternative_name()
        .map_err(|e| invalid(e.to_string()))?
        .and_then(|san| {
            san.value.general_names.iter().find_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => u
                    .strip_prefix("spiffe://")
                    .map(|td| td.trim_end_matches('/').to_owned()),
                _ => None,
            })
        });
    let not_after = u64::try_from(cert.validity().not_after.timestamp())
        .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s))
        .map_err(|_| invalid("notAfter before 1970".into()))?;
    Ok((td, not_after))
}

/// The trust domain a CA certificate names in its URI SAN.
pub(crate) fn trust_domain_of(path: &Path, der: &[u8]) -> Result<TrustDomain, CaError> {
    let (td, _) = inspect_ca_cert(path, der)?;
    td.and_then(|t| t.parse().ok())
        .ok_or_else(|| CaError::Invalid {
            path: path.to_owned(),
            reason: "names no trust domain (no spiffe:// URI SAN)".into(),
        })
}

/// Loads the CA from `dir`, checking key file modes, the trust domain and the chain.
pub fn load(dir: &Path, trust_domain: &TrustDomain) -> Result<CaMaterial, CaError> {
    if !exists(dir) {
        return Err(CaError::NotInitialized {
            dir: dir.to_owned(),
        });
    }
    for key in [ROOT_KEY, INTERMEDIATE_KEY, JWT_KEY] {
        let path = dir.join(key);
        if key != ROOT_KEY || path.exists() {
            check_key_mode(&path)?;
        }
    }
    let root_path = dir.join(ROOT_CERT);
    let inter_path = dir.join(INTERMEDIATE_CERT);
    let root_der = read_pem(&root_path, "CERTIFICATE")?;
    let intermediate_der = read_pem(&inter_path, "CERTIFICATE")?;
    let (_, _) = inspect_ca_cert(&root_path, &root_der)?;
    let (inter_td, intermediate_not_after) = inspect_ca_cert(&inter_path, &intermediate_der)?;
    match inter_td {
        Some(td) if td == trust_domain.as_str() => {}
        found => {
            return Err(CaError::TrustDomainMismatch {
                path: inter_path,
                found: found.unwrap_or_default(),
                expected: trust_domain.to_string(),
            });
        }
    }
    // The intermediate must be signed by the root we publish, or every SVID would fail to verify.
    let chained = x509_parser::parse_x509_certificate(&root_der)
        .ok()
        .zip(x509_parser::parse_x509_certificate(&intermediate_der).ok())
        .is_some_and(|((_, root), (_, inter))| {
            inter.verify_signature(Some(root.public_key())).is_ok()
        });
    if !chained {
        return Err(CaError::Invalid {
            path: inter_path,
            reason: format!("not signed by the root in {ROOT_CERT}"),
        });
    }
    let key_path = dir.join(INTERMEDIATE_KEY);
    let key_der = read_pem(&key_path, "PRIVATE KEY")?;
    let intermediate_key = KeyPair::try_from(key_der.as_slice()).map_err(|e| CaError::Invalid {
        path: key_path.clone(),
        reason: e.to_string(),
    })?;
    let matches_cert =
        x509_parser::parse_x509_certificate(&intermediate_der).is_ok_and(|(_, c)| {
            c.public_key().subject_public_key.data == intermediate_key.public_key_raw()
        });
    if !matches_cert {
        return Err(CaError::Invalid {
            path: key_path,
            reason: format!("does not match the certificate in {INTERMEDIATE_CERT}"),
        });
    }
    let jwt_pkcs8 = Secret::new(read_pem(&dir.join(JWT_KEY), "PRIVATE KEY")?);
    Ok(CaMaterial {
        root_der,
        intermediate_der,
        intermediate_key,
        intermediate_not_after,
        jwt_pkcs8,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn td() -> TrustDomain {
        "example.org".parse().unwrap()
    }

    #[test]
    fn init_then_load() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), &td(), InitOptions::default(), SystemTime::now()).unwrap();
        for key in [ROOT_KEY, INTERMEDIATE_KEY, JWT_KEY] {
            let mode = std::fs::metadata(dir.path().join(key)).unwrap().mode() & 0o777;
            assert_eq!(mode, 0o600, "{key}");
        }
        let ca = load(dir.path(), &td()).unwrap();
        assert!(ca.intermediate_not_after > SystemTime::now() + Duration::from_secs(300 * 86_400));
        assert!(matches!(
            init(dir.path(), &td(), InitOptions::default(), SystemTime::now()),
            Err(CaError::AlreadyInitialized { .. })
        ));
        // The root key may be taken offline.
        std::fs::remove_file(dir.path().join(ROOT_KEY)).unwrap();
        assert!(load(dir.path(), &td()).is_ok());
    }

    #[test]
    fn refuses_loose_key_modes_naming_file_and_fix() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path(), &td(), InitOptions::default(), SystemTime::now()).unwrap();
        let key = dir.path().join(JWT_KEY);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load(dir.path(), &td()).err().unwrap();
        let msg = err.to_string();
        assert!(
            matches!(err, CaError::KeyFileMode { mode: 0o644, .. }),
            "{msg}"
        );
        assert!(msg.contains(&key.display().to_string()), "{msg}");
        assert!(msg.contains("chmod 600"), "{msg}");
    }

    #[test]
    fn refuses_other_trust_domain_and_missing_ca() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            load(dir.path(), &td()),
            Err(CaError::NotInitialized { .. })
        ));
        init(dir.path(), &td(), InitOptions::default(), SystemTime::now()).unwrap();
        let other: TrustDomain = "other.org".parse().unwrap();
        assert!(matches!(
            load(dir.path(), &other),
            Err(CaError::TrustDomainMismatch { .. })
        ));
    }
}
