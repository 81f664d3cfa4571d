//! `ephemera admin`: operator commands against a running broker's Admin API.
//!
//! The admin token comes from `--admin-token-file`, else `EPHEMERA_ADMIN_TOKEN_FILE`, else the
//! running broker's `endpoints.json`, else `<data-dir>/admin.token`.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

use super::{ConnectArgs, EXIT_USAGE, Failure, rfc3339, ttl_secs};
use crate::api::pb::v1::CreateJoinTokenRequest;
use crate::api::pb::v1::admin_client::AdminClient;
use crate::endpoints::Endpoints;

/// `ephemera admin ...`
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Join tokens: single-use bootstrap credentials.
    JoinToken {
        /// The join-token command.
        #[command(subcommand)]
        command: JoinTokenCommand,
    },
}

/// `ephemera admin join-token ...`
#[derive(Debug, Subcommand)]
pub enum JoinTokenCommand {
    /// Create a join token and print it (only the token on stdout).
    Create(CreateArgs),
}

/// `ephemera admin join-token create` arguments.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Name of the holder, claims.name in identity mapping.
    #[arg(long)]
    pub name: String,
    /// Lifetime, e.g. 30m (default 1h, at most 7d).
    #[arg(long)]
    pub ttl: Option<String>,
    /// Extra claim for mapping and policy, as key=value; repeatable.
    #[arg(long = "claim", value_name = "KEY=VALUE")]
    pub claims: Vec<String>,
    /// Print JSON with the token, id and expiry.
    #[arg(long)]
    pub json: bool,
    /// Admin credentials and broker address.
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// How admin commands authenticate.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// File holding the admin token.
    #[arg(long, env = "EPHEMERA_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// How to reach the broker.
    #[command(flatten)]
    pub conn: ConnectArgs,
}

impl AdminArgs {
    fn token(&self) -> Result<String, Failure> {
        let path = self
            .admin_token_file
            .clone()
            .or_else(|| {
                Endpoints::read(&self.conn.data_dir)
                    .ok()
                    .and_then(|e| e.admin_token_file)
            })
            .unwrap_or_else(|| self.conn.data_dir.join(crate::api::admin::TOKEN_FILE));
        let token = std::fs::read_to_string(&path)
            .with_context(|| {
                format!(
                    "reading the admin token {} (pass --admin-token-file)",
                    path.display()
                )
            })
            .map_err(|e| Failure::new(EXIT_USAGE, e))?;
        Ok(token.trim().to_owned())
    }

    fn request<T>(&self, msg: T) -> Result<tonic::Request<T>, Failure> {
        let mut req = tonic::Request::new(msg);
        let value = format!("Bearer {}", self.token()?).parse().map_err(|_| {
            Failure::new(EXIT_USAGE, anyhow::anyhow!("admin token is not valid text"))
        })?;
        req.metadata_mut().insert("authorization", value);
        Ok(req)
    }
}

/// Runs `ephemera admin ...`.
pub async fn run(cmd: AdminCommand) -> Result<(), Failure> {
    match cmd {
        AdminCommand::JoinToken {
            command: JoinTokenCommand::Create(args),
        } => {
            let mut claims = HashMap::new();
            for c in &args.claims {
                let (k, v) = c.split_once('=').ok_or_else(|| {
                    Failure::new(
                        EXIT_USAGE,
                        anyhow::anyhow!("--claim {c:?}: expected KEY=VALUE"),
                    )
                })?;
                claims.insert(k.to_owned(), v.to_owned());
            }
            let req = args.admin.request(CreateJoinTokenRequest {
                name: args.name.clone(),
                ttl_seconds: ttl_secs(args.ttl.as_deref())?,
                claims,
            })?;
            let channel = args.admin.conn.options().connect().await?;
            let resp = AdminClient::new(channel)
                .create_join_token(req)
                .await?
                .into_inner();
            let mut out = std::io::stdout().lock();
            if args.json {
                let doc = serde_json::json!({
                    "token": resp.token,
                    "id": resp.id,
                    "expires_at": rfc3339(resp.expires_at),
                });
                writeln!(out, "{doc:#}")
            } else {
                writeln!(out, "{}", resp.token)
            }
            .context("writing to stdout")?;
            eprintln!(
                "join token {} for {} expires {}; it works once: pass it with --join-token",
                resp.id,
                args.name,
                rfc3339(resp.expires_at)
            );
            Ok(())
        }
    }
}
