//! `ephemera ca ...` against a running broker: the signing keys' status, forced rotation,
//! revoking a compromised key, and the offline root's part (fetch the CSR, sign it on the
//! root's machine, stage the certificate; make a new root and stage it).

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use super::admin::{AdminArgs, admin_client};
use super::{EXIT_USAGE, Failure, rfc3339};
use crate::api::pb::v1::{
    GetIntermediateCsrRequest, ListSigningKeysRequest, RevokeSigningKeyRequest,
    RotateSigningKeyRequest, SigningKeyInfo, StageIntermediateRequest,
};

/// `ephemera ca status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Show the CA files in the data directory instead of asking the broker (before the first
    /// start, or while it is down).
    #[arg(long)]
    pub files: bool,
    /// Print JSON lines, one per key.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// `ephemera ca rotate`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("kind").required(true).args(["x509", "jwt", "root"])))]
pub struct RotateArgs {
    /// Rotate the X.509 intermediate.
    #[arg(long)]
    pub x509: bool,
    /// Rotate the JWT signing key.
    #[arg(long)]
    pub jwt: bool,
    /// Make a new root (the broker must hold the root key): published now, the root the next
    /// intermediates chain to two refresh hints later. `--x509` afterwards moves the
    /// intermediate under it at once.
    #[arg(long)]
    pub root: bool,
    /// Sign with the new key at once, before relying parties may have fetched it.
    #[arg(long)]
    pub immediately: bool,
    /// Print the new key as one JSON line.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// `ephemera ca revoke-key`.
#[derive(Debug, Args)]
pub struct RevokeKeyArgs {
    /// The key's id, from `ephemera ca status`.
    pub id: String,
    /// Why (recorded in the audit log and the revocation event).
    #[arg(long)]
    pub reason: String,
    /// Print the result as one JSON line.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// `ephemera ca csr`.
#[derive(Debug, Args)]
pub struct CsrArgs {
    /// Write the CSR here instead of standard output.
    #[arg(long, short)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// `ephemera ca stage`.
#[derive(Debug, Args)]
pub struct StageArgs {
    /// The certificate `ephemera ca sign-intermediate` wrote, or a new root's from `ephemera ca
    /// new-root` (PEM).
    pub certificate: PathBuf,
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// `ephemera ca new-root`.
#[derive(Debug, Args)]
pub struct NewRootArgs {
    /// A new directory for the root's certificate and key (on the root's machine).
    #[arg(long)]
    pub root_dir: PathBuf,
    /// The trust domain.
    #[arg(long, env = "EPHEMERA_TRUST_DOMAIN")]
    pub trust_domain: String,
    /// The root's lifetime.
    #[arg(long, default_value = "3650d")]
    pub ttl: String,
    /// Also write the certificate here (to stage), besides standard output.
    #[arg(long, short)]
    pub out: Option<PathBuf>,
}

/// `ephemera ca sign-intermediate`.
#[derive(Debug, Args)]
pub struct SignArgs {
    /// The directory holding root-ca.pem and root-ca.key (on the root's machine).
    #[arg(long)]
    pub root_dir: PathBuf,
    /// The CSR from `ephemera ca csr`.
    #[arg(long)]
    pub csr: PathBuf,
    /// The intermediate's lifetime (capped at the root's end).
    #[arg(long, default_value = "365d")]
    pub ttl: String,
    /// Write the certificate here instead of standard output.
    #[arg(long, short)]
    pub out: Option<PathBuf>,
}

fn key_json(k: &SigningKeyInfo) -> serde_json::Value {
    let time = |t: i64| (t > 0).then(|| rfc3339(t));
    serde_json::json!({
        "id": k.id,
        "kind": k.kind,
        "state": k.state,
        "serial": (!k.serial.is_empty()).then_some(&k.serial),
        "not_before": time(k.not_before),
        "not_after": time(k.not_after),
        "activate_at": time(k.activate_at),
        "hand_over_at": time(k.hand_over_at),
        "live_credentials": k.live_credentials,
        "note": k.note,
    })
}

fn key_line(k: &SigningKeyInfo, now: i64) -> String {
    let when = match k.state.as_str() {
        "pending" => "waiting for the offline root to sign its CSR".to_owned(),
        "prepared" => format!("published; signs from {}", rfc3339(k.activate_at)),
        "active" if k.hand_over_at > 0 => {
            format!("signs; hands over at {}", rfc3339(k.hand_over_at))
        }
        "active" => "signs".to_owned(),
        "retired" => format!("published until {}", rfc3339(k.not_after)),
        _ => format!("withdrawn: {}", k.note),
    };
    format!(
        "{:<18} {:<9} {:<43} until {} ({} days left), {} live credentials; {when}",
        k.kind,
        k.state,
        k.id,
        rfc3339(k.not_after),
        (k.not_after - now).max(0) / 86_400,
        k.live_credentials,
    )
}

/// `ephemera ca status`.
pub async fn status(args: StatusArgs) -> Result<(), Failure> {
    if args.files {
        return super::server::ca_status(&args.admin.conn.data_dir, args.json);
    }
    let req = args.admin.request(ListSigningKeysRequest {})?;
    let r = admin_client(&args.admin)
        .await?
        .list_signing_keys(req)
        .await?
        .into_inner();
    let now = crate::clock::unix_secs(std::time::SystemTime::now());
    let mut out = std::io::stdout().lock();
    for k in &r.keys {
        if args.json {
            writeln!(out, "{}", key_json(k))
        } else {
            writeln!(out, "{}", key_line(k, now))
        }
        .context("writing to stdout")?;
    }
    if !args.json {
        writeln!(
            out,
            "bundle sequence {}, refresh hint {}s; the root key is {}",
            r.sequence,
            r.refresh_hint_seconds,
            if r.root_online {
                "held by the broker"
            } else {
                "offline"
            }
        )
        .context("writing to stdout")?;
    }
    for p in &r.problems {
        eprintln!("problem: {p}");
    }
    Ok(())
}

/// `ephemera ca rotate`.
pub async fn rotate(args: RotateArgs) -> Result<(), Failure> {
    let kind = if args.x509 {
        "x509-intermediate"
    } else if args.root {
        "x509-root"
    } else {
        "jwt"
    };
    let req = args.admin.request(RotateSigningKeyRequest {
        kind: kind.into(),
        immediately: args.immediately,
    })?;
    let k = admin_client(&args.admin)
        .await?
        .rotate_signing_key(req)
        .await?
        .into_inner();
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", key_json(&k))
    } else if k.state == "active" {
        writeln!(out, "{kind} key {} signs from now on", k.id)
    } else {
        writeln!(
            out,
            "{kind} key {} is published and signs from {}",
            k.id,
            rfc3339(k.activate_at)
        )
    }
    .context("writing to stdout")?;
    Ok(())
}

/// `ephemera ca revoke-key`.
pub async fn revoke_key(args: RevokeKeyArgs) -> Result<(), Failure> {
    let req = args.admin.request(RevokeSigningKeyRequest {
        id: args.id.clone(),
        reason: args.reason.clone(),
    })?;
    let r = admin_client(&args.admin)
        .await?
        .revoke_signing_key(req)
        .await?
        .into_inner();
    let mut out = std::io::stdout().lock();
    if args.json {
        let mut doc = key_json(&r.key.unwrap_or_default());
        doc["credentials_revoked"] = r.credentials_revoked.into();
        doc["cursor"] = r.cursor.into();
        writeln!(out, "{doc}")
    } else {
        writeln!(
            out,
            "key {} revoked: removed from every bundle; {} live credential(s) revoked (cursor {})",
            args.id, r.credentials_revoked, r.cursor
        )
    }
    .context("writing to stdout")?;
    Ok(())
}

fn write_out(path: Option<&PathBuf>, text: &str) -> Result<(), Failure> {
    match path {
        Some(p) => std::fs::write(p, text)
            .with_context(|| format!("writing {}", p.display()))
            .map_err(|e| Failure::new(1, e)),
        None => std::io::stdout()
            .lock()
            .write_all(text.as_bytes())
            .context("writing to stdout")
            .map_err(|e| Failure::new(1, e)),
    }
}

/// `ephemera ca csr`.
pub async fn csr(args: CsrArgs) -> Result<(), Failure> {
    let req = args.admin.request(GetIntermediateCsrRequest {})?;
    let r = admin_client(&args.admin)
        .await?
        .get_intermediate_csr(req)
        .await?
        .into_inner();
    eprintln!("CSR of pending intermediate {}", r.id);
    write_out(args.out.as_ref(), &r.csr_pem)
}

/// `ephemera ca stage`.
pub async fn stage(args: StageArgs) -> Result<(), Failure> {
    let pem = std::fs::read_to_string(&args.certificate)
        .with_context(|| format!("reading {}", args.certificate.display()))
        .map_err(|e| Failure::new(EXIT_USAGE, e))?;
    let req = args.admin.request(StageIntermediateRequest {
        certificate_pem: pem,
    })?;
    let k = admin_client(&args.admin)
        .await?
        .stage_intermediate(req)
        .await?
        .into_inner();
    let what = if k.kind == "x509-root" {
        "the root the next intermediates chain to"
    } else {
        "it signs"
    };
    writeln!(
        std::io::stdout().lock(),
        "{} {} staged and published: {what} from {}",
        k.kind,
        k.id,
        rfc3339(k.activate_at)
    )
    .context("writing to stdout")?;
    Ok(())
}

/// `ephemera ca new-root` (offline: writes only to `--root-dir`).
pub fn new_root(args: &NewRootArgs) -> Result<(), Failure> {
    let usage = |e: anyhow::Error| Failure::new(EXIT_USAGE, e);
    let ttl = crate::config::parse_duration(&args.ttl)
        .map_err(|e| usage(anyhow::anyhow!("--ttl: {e}")))?;
    let td: crate::id::TrustDomain = args
        .trust_domain
        .parse()
        .map_err(|e| usage(anyhow::anyhow!("--trust-domain: {e}")))?;
    let cert = crate::ca::lifecycle::new_root_files(
        &args.root_dir,
        &td,
        ttl,
        std::time::SystemTime::now(),
    )
    .map_err(|e| Failure::new(1, e))?;
    eprintln!(
        "new root written to {}; stage its certificate with `ephemera ca stage`",
        args.root_dir.display()
    );
    if let Some(out) = &args.out {
        write_out(Some(out), &cert)?;
    }
    write_out(None, &cert)
}

/// `ephemera ca sign-intermediate` (offline: needs only the root's directory).
pub fn sign_intermediate(args: &SignArgs) -> Result<(), Failure> {
    let usage = |e: anyhow::Error| Failure::new(EXIT_USAGE, e);
    let ttl = crate::config::parse_duration(&args.ttl)
        .map_err(|e| usage(anyhow::anyhow!("--ttl: {e}")))?;
    let csr = std::fs::read_to_string(&args.csr)
        .with_context(|| format!("reading {}", args.csr.display()))
        .map_err(usage)?;
    let cert = crate::ca::lifecycle::sign_intermediate(
        &args.root_dir,
        &csr,
        ttl,
        std::time::SystemTime::now(),
    )
    .map_err(|e| usage(e.into()))?;
    write_out(args.out.as_ref(), &cert)
}
