//! `ephemera svid`: generate a key locally, send only a CSR, and write the X.509-SVID.
//!
//! Writes `svid.pem` (leaf + intermediate), `svid.key` (mode 0600) and `bundle.pem` (trust
//! anchors). The private key never leaves this process except into `svid.key`.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};

use super::{ConnectArgs, EvidenceArgs, Failure, rfc3339, ttl_secs};
use crate::api::pb::v1::MintX509SvidRequest;

/// `ephemera svid` arguments.
#[derive(Debug, Args)]
pub struct SvidArgs {
    /// Directory to write svid.pem, svid.key and bundle.pem into (created 0700 if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Requested lifetime, e.g. 1h (clamped by the broker's maximum).
    #[arg(long)]
    pub ttl: Option<String>,
    /// Which of your SPIFFE IDs to use when you have several.
    #[arg(long)]
    pub spiffe_id: Option<String>,
    /// Bind the credential to this task (you must own it); it is revoked when the task ends.
    #[arg(long, env = "EPHEMERA_TASK_ID")]
    pub task: Option<String>,
    /// Print JSON (identity, files written, serial, expiry, lease) instead of text.
    #[arg(long)]
    pub json: bool,
    /// Evidence to present.
    #[command(flatten)]
    pub evidence: EvidenceArgs,
    /// How to reach the broker.
    #[command(flatten)]
    pub conn: ConnectArgs,
}

pub(super) fn pem_all(tag: &str, ders: &[Vec<u8>]) -> String {
    ders.iter()
        .map(|d| pem::encode(&pem::Pem::new(tag, d.clone())))
        .collect()
}

/// Writes `contents` to `path` with `mode`, replacing it atomically.
pub(super) fn write_file(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(contents)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// Runs `ephemera svid`.
pub async fn run(args: SvidArgs) -> Result<(), Failure> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).context("generating key")?;
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .context("creating CSR")?;
    let evidence = args.evidence.resolve().await?;
    let mut client = args.conn.options().broker().await?;
    let resp = client
        .mint_x509_svid(evidence.request(MintX509SvidRequest {
            csr: csr.der().to_vec(),
            ttl_seconds: ttl_secs(args.ttl.as_deref())?,
            spiffe_id: args.spiffe_id.unwrap_or_default(),
            task_id: args.task.unwrap_or_default(),
        }))
        .await?
        .into_inner();

    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let cert_path = args.out.join("svid.pem");
    let key_path = args.out.join("svid.key");
    let bundle_path = args.out.join("bundle.pem");
    write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(
        &cert_path,
        pem_all("CERTIFICATE", &resp.cert_chain).as_bytes(),
        0o644,
    )?;
    write_file(
        &bundle_path,
        pem_all("CERTIFICATE", &resp.bundle).as_bytes(),
        0o644,
    )?;
    let mut out = std::io::stdout().lock();
    if args.json {
        let doc = serde_json::json!({
            "spiffe_id": resp.spiffe_id,
            "certificate": cert_path.display().to_string(),
            "key": key_path.display().to_string(),
            "bundle": bundle_path.display().to_string(),
            "serial": resp.serial,
            "expires_at": rfc3339(resp.expires_at),
            "lease_id": resp.lease_id,
        });
        writeln!(out, "{doc}")
    } else {
        writeln!(
            out,
            "{}\n  wrote {} (leaf + intermediate), {} (0600), {}\n  serial {}, expires {}",
            resp.spiffe_id,
            cert_path.display(),
            key_path.display(),
            bundle_path.display(),
            resp.serial,
            rfc3339(resp.expires_at)
        )
    }
    .context("writing to stdout")?;
    Ok(())
}
