//! `ephemera token`: mint a JWT-SVID and print it (only the token on stdout, for `$(...)`).

use std::io::Write;

use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use clap::Args;

use super::{ConnectArgs, EvidenceArgs, Failure, rfc3339, ttl_secs};
use crate::api::pb::v1::MintJwtSvidRequest;

/// `ephemera token` arguments.
#[derive(Debug, Args)]
pub struct TokenArgs {
    /// Audience for the token; repeat for several (1 to 16).
    #[arg(long, short, required = true)]
    pub audience: Vec<String>,
    /// Requested lifetime, e.g. 5m (clamped by the broker's maximum).
    #[arg(long)]
    pub ttl: Option<String>,
    /// Which of your SPIFFE IDs to use when you have several.
    #[arg(long)]
    pub spiffe_id: Option<String>,
    /// Bind the credential to this task (you must own it); it is revoked when the task ends.
    #[arg(long, env = "EPHEMERA_TASK_ID")]
    pub task: Option<String>,
    /// Print JSON with the token, its SPIFFE ID, expiry and decoded header and claims.
    #[arg(long)]
    pub json: bool,
    /// Evidence to present.
    #[command(flatten)]
    pub evidence: EvidenceArgs,
    /// How to reach the broker.
    #[command(flatten)]
    pub conn: ConnectArgs,
}

fn decode_part(token: &str, index: usize) -> Option<serde_json::Value> {
    let part = token.split('.').nth(index)?;
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).ok()?).ok()
}

/// Runs `ephemera token`.
pub async fn run(args: TokenArgs) -> Result<(), Failure> {
    let evidence = args.evidence.resolve().await?;
    let mut client = args.conn.options().broker().await?;
    let resp = client
        .mint_jwt_svid(evidence.request(MintJwtSvidRequest {
            audience: args.audience,
            ttl_seconds: ttl_secs(args.ttl.as_deref())?,
            spiffe_id: args.spiffe_id.unwrap_or_default(),
            task_id: args.task.unwrap_or_default(),
        }))
        .await?
        .into_inner();
    let mut out = std::io::stdout().lock();
    if args.json {
        let doc = serde_json::json!({
            "token": resp.token,
            "spiffe_id": resp.spiffe_id,
            "expires_at": rfc3339(resp.expires_at),
            "jti": resp.jti,
            "header": decode_part(&resp.token, 0),
            "claims": decode_part(&resp.token, 1),
        });
        writeln!(out, "{doc}")
    } else {
        writeln!(out, "{}", resp.token)
    }
    .context("writing to stdout")?;
    Ok(())
}
