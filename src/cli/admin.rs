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
use crate::api::pb::v1::admin_client::AdminClient;
use crate::api::pb::v1::{
    CreateJoinTokenRequest, CreateLockRequest, DeleteLockRequest, GetLeaseRequest, LeaseInfo,
    ListLeasesRequest, ListLocksRequest, ListTasksRequest, LockInfo, ReloadPolicyRequest,
    RevokeIdentityRequest, RevokeLeaseRequest, RevokeTaskRequest, TaskInfo,
};
use crate::endpoints::Endpoints;

/// `ephemera admin ...`
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Tasks.
    Tasks {
        /// The tasks command.
        #[command(subcommand)]
        command: TasksCommand,
    },
    /// Leases (one per issued credential).
    Leases {
        /// The leases command.
        #[command(subcommand)]
        command: LeasesCommand,
    },
    /// Revoke a lease, a task, or every task of an identity.
    Revoke {
        /// What to revoke.
        #[command(subcommand)]
        target: RevokeTarget,
    },
    /// Policy.
    Policy {
        /// The policy command.
        #[command(subcommand)]
        command: AdminPolicyCommand,
    },
    /// Locks: stop an identity, a claim, a subject, an executable or an address range at once.
    Lock {
        /// The lock command.
        #[command(subcommand)]
        command: LockCommand,
    },
    /// Join tokens: single-use bootstrap credentials.
    JoinToken {
        /// The join-token command.
        #[command(subcommand)]
        command: JoinTokenCommand,
    },
}

/// `ephemera admin tasks ...`
#[derive(Debug, Subcommand)]
pub enum TasksCommand {
    /// List tasks, newest first.
    List(ListArgs),
}

/// `ephemera admin leases ...`
#[derive(Debug, Subcommand)]
pub enum LeasesCommand {
    /// List leases, newest first.
    List {
        /// Only this task's leases.
        #[arg(long)]
        task: Option<String>,
        /// Listing options.
        #[command(flatten)]
        list: ListArgs,
    },
    /// Show one lease, by id, jti or serial.
    Get {
        /// Lease id, jti or serial.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Admin credentials and broker address.
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// Filters and output of listings.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Only this SPIFFE ID.
    #[arg(long)]
    pub spiffe_id: Option<String>,
    /// Only rows in this state: any state the listing shows (tasks: active, ended, expired,
    /// revoked; leases: active, revoked, expired, task_ended, task_expired, task_revoked), or
    /// inactive (any but active).
    #[arg(long)]
    pub state: Option<String>,
    /// At most this many rows (1 to 1000); with --all, rows fetched per page.
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
    /// Every row, however many pages.
    #[arg(long)]
    pub all: bool,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Admin credentials and broker address.
    #[command(flatten)]
    pub admin: AdminArgs,
}

/// `ephemera admin revoke ...`
#[derive(Debug, Subcommand)]
pub enum RevokeTarget {
    /// One lease, by id, jti or serial.
    Lease {
        /// Lease id, jti or serial.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Admin credentials and broker address.
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// A task and every credential of it.
    Task {
        /// Task id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Admin credentials and broker address.
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Every active task of a SPIFFE ID.
    Identity {
        /// SPIFFE ID.
        spiffe_id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Admin credentials and broker address.
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// `ephemera admin policy ...`
#[derive(Debug, Subcommand)]
pub enum AdminPolicyCommand {
    /// Reload the broker's policy directory now; returns once the new policies serve and
    /// every live task and credential has been decided again under them.
    Reload {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Admin credentials and broker address.
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// `ephemera admin lock ...`
#[derive(Debug, Subcommand)]
pub enum LockCommand {
    /// Lock a target: nothing is issued to it and everything it holds is revoked now.
    ///
    /// TARGET is one of: spiffe_id=ID, spiffe_id=PREFIX/* (every ID under a path),
    /// claim:NAME=VALUE (a claim as policy sees it, e.g. claim:repository=acme/api or
    /// claim:kubernetes.io.namespace=ci), subject=S (an attestor's subject, e.g. uid:1000),
    /// exe_sha256=HEX, cidr=ADDR/BITS.
    Create {
        /// What to lock.
        target: String,
        /// Why (required; refused callers see "locked: <reason>").
        #[arg(long)]
        reason: String,
        /// Lifetime, e.g. 2h (default: until deleted).
        #[arg(long)]
        ttl: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Admin credentials and broker address.
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List locks, newest first.
    List {
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
        /// Admin credentials and broker address.
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Delete a lock (what it revoked stays revoked).
    Delete {
        /// Lock id.
        id: String,
        /// Admin credentials and broker address.
        #[command(flatten)]
        admin: AdminArgs,
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
            .unwrap_or_else(|| crate::datadir::DataDir::new(&self.conn.data_dir).admin_token());
        let token = std::fs::read_to_string(&path)
            .with_context(|| {
                format!(
                    "reading the admin token {} (pass --admin-token-file)",
                    path.display()
                )
            })
            .map_err(|e| Failure::new(EXIT_USAGE, e))?;
        // During a rotation the file holds the new token first and the previous one after it.
        crate::api::admin::admin_tokens(&token)
            .first()
            .map(|t| (*t).to_owned())
            .ok_or_else(|| {
                Failure::new(
                    EXIT_USAGE,
                    anyhow::anyhow!("the admin token file {} is empty", path.display()),
                )
            })
    }

    pub(super) fn request<T>(&self, msg: T) -> Result<tonic::Request<T>, Failure> {
        let mut req = tonic::Request::new(msg);
        let value = format!("Bearer {}", self.token()?).parse().map_err(|_| {
            Failure::new(EXIT_USAGE, anyhow::anyhow!("admin token is not valid text"))
        })?;
        req.metadata_mut().insert("authorization", value);
        Ok(req)
    }
}

fn when(secs: i64) -> String {
    if secs == 0 {
        "-".to_owned()
    } else {
        rfc3339(secs)
    }
}

/// Prints rows as an aligned table with a header.
fn table(out: &mut impl Write, header: &[&str], rows: &[Vec<String>]) -> std::io::Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
    };
    writeln!(out, "{}", line(header.to_vec()))?;
    for r in rows {
        writeln!(out, "{}", line(r.iter().map(String::as_str).collect()))?;
    }
    Ok(())
}

/// RFC 3339 for a time that is set (0 means unset in the Admin API's messages).
fn time_json(secs: i64) -> serde_json::Value {
    if secs == 0 {
        serde_json::Value::Null
    } else {
        rfc3339(secs).into()
    }
}

fn task_json(t: &TaskInfo) -> serde_json::Value {
    serde_json::json!({
        "id": t.id, "spiffe_id": t.spiffe_id, "attestor": t.attestor, "labels": t.labels,
        "state": t.state, "created_at": time_json(t.created_at), "deadline": time_json(t.deadline),
        "due_at": time_json(t.due_at), "ended_at": time_json(t.ended_at),
        "reason": (!t.reason.is_empty()).then_some(&t.reason),
    })
}

fn lease_json(l: &LeaseInfo) -> serde_json::Value {
    serde_json::json!({
        "id": l.id, "task_id": (!l.task_id.is_empty()).then_some(&l.task_id), "kind": l.kind,
        "serial": (!l.serial.is_empty()).then_some(&l.serial), "spiffe_id": l.spiffe_id,
        "audience": l.audience, "issued_at": time_json(l.issued_at),
        "expires_at": time_json(l.expires_at), "active": l.active, "state": l.state,
        "revoked_at": time_json(l.revoked_at), "reason": (!l.reason.is_empty()).then_some(&l.reason),
    })
}

fn lease_row(l: &LeaseInfo) -> Vec<String> {
    vec![
        l.id.clone(),
        l.kind.clone(),
        l.state.clone(),
        l.spiffe_id.clone(),
        if l.task_id.is_empty() {
            "-".into()
        } else {
            l.task_id.clone()
        },
        when(l.expires_at),
    ]
}

const LEASE_HEADER: [&str; 6] = ["LEASE", "KIND", "STATE", "SPIFFE ID", "TASK", "EXPIRES"];

/// Fetches the first page, or every page with `all`; returns the items and whether more remain.
async fn pages<T>(
    all: bool,
    mut fetch: impl AsyncFnMut(String) -> Result<(Vec<T>, String), Failure>,
) -> Result<(Vec<T>, bool), Failure> {
    let mut items = Vec::new();
    let mut token = String::new();
    loop {
        let (page, next) = fetch(token).await?;
        items.extend(page);
        token = next;
        if token.is_empty() || !all {
            return Ok((items, !token.is_empty()));
        }
    }
}

/// Prints a listing as JSON lines or a table, with a hint on stderr when pages remain.
fn print_list(
    out: &mut impl Write,
    json: bool,
    docs: impl Iterator<Item = serde_json::Value>,
    header: &[&str],
    rows: &[Vec<String>],
    more: Option<&str>,
) -> Result<(), Failure> {
    if json {
        for d in docs {
            writeln!(out, "{d}").context("writing to stdout")?;
        }
    } else {
        table(out, header, rows).context("writing to stdout")?;
    }
    if let Some(hint) = more {
        eprintln!("{hint}");
    }
    Ok(())
}

pub(super) async fn admin_client(
    admin: &AdminArgs,
) -> Result<AdminClient<tonic::transport::Channel>, Failure> {
    Ok(AdminClient::new(admin.conn.options().connect().await?))
}

/// Runs `ephemera admin ...`.
pub async fn run(cmd: AdminCommand) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    match cmd {
        AdminCommand::Tasks {
            command: TasksCommand::List(list),
        } => {
            let mut client = admin_client(&list.admin).await?;
            let (tasks, more) = pages(list.all, async |page_token| {
                let r = client
                    .list_tasks(list.admin.request(ListTasksRequest {
                        spiffe_id: list.spiffe_id.clone().unwrap_or_default(),
                        state: list.state.clone().unwrap_or_default(),
                        page_size: list.limit,
                        page_token,
                    })?)
                    .await?
                    .into_inner();
                Ok((r.tasks, r.next_page_token))
            })
            .await?;
            let rows = tasks
                .iter()
                .map(|t| {
                    let labels: Vec<String> =
                        t.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    vec![
                        t.id.clone(),
                        t.state.clone(),
                        t.spiffe_id.clone(),
                        when(t.deadline),
                        labels.join(","),
                    ]
                })
                .collect::<Vec<_>>();
            print_list(
                &mut out,
                list.json,
                tasks.iter().map(task_json),
                &["TASK", "STATE", "SPIFFE ID", "DEADLINE", "LABELS"],
                &rows,
                more.then_some("more tasks: pass --all"),
            )
        }
        AdminCommand::Leases {
            command: LeasesCommand::List { task, list },
        } => {
            let mut client = admin_client(&list.admin).await?;
            let (leases, more) = pages(list.all, async |page_token| {
                let r = client
                    .list_leases(list.admin.request(ListLeasesRequest {
                        task_id: task.clone().unwrap_or_default(),
                        spiffe_id: list.spiffe_id.clone().unwrap_or_default(),
                        state: list.state.clone().unwrap_or_default(),
                        page_size: list.limit,
                        page_token,
                    })?)
                    .await?
                    .into_inner();
                Ok((r.leases, r.next_page_token))
            })
            .await?;
            let rows = leases.iter().map(lease_row).collect::<Vec<_>>();
            print_list(
                &mut out,
                list.json,
                leases.iter().map(lease_json),
                &LEASE_HEADER,
                &rows,
                more.then_some("more leases: pass --all"),
            )
        }
        AdminCommand::Leases {
            command: LeasesCommand::Get { id, json, admin },
        } => {
            let l = admin_client(&admin)
                .await?
                .get_lease(admin.request(GetLeaseRequest { id })?)
                .await?
                .into_inner();
            if json {
                writeln!(out, "{}", lease_json(&l))
            } else {
                table(
                    &mut out,
                    &["LEASE", "KIND", "STATE", "SPIFFE ID", "TASK", "EXPIRES"],
                    &[lease_row(&l)],
                )
            }
            .context("writing to stdout")?;
            Ok(())
        }
        AdminCommand::Revoke { target } => {
            let (kind, what, json, resp) = match target {
                RevokeTarget::Lease { id, json, admin } => (
                    "lease",
                    id.clone(),
                    json,
                    admin_client(&admin)
                        .await?
                        .revoke_lease(admin.request(RevokeLeaseRequest { id })?)
                        .await?,
                ),
                RevokeTarget::Task { id, json, admin } => (
                    "task",
                    id.clone(),
                    json,
                    admin_client(&admin)
                        .await?
                        .revoke_task(admin.request(RevokeTaskRequest { task_id: id })?)
                        .await?,
                ),
                RevokeTarget::Identity {
                    spiffe_id,
                    json,
                    admin,
                } => (
                    "identity",
                    spiffe_id.clone(),
                    json,
                    admin_client(&admin)
                        .await?
                        .revoke_identity(admin.request(RevokeIdentityRequest { spiffe_id })?)
                        .await?,
                ),
            };
            let r = resp.into_inner();
            if json {
                let doc = serde_json::json!({
                    kind: what,
                    "revoked": !r.already_revoked,
                    "task_ids": r.task_ids,
                    "credentials_revoked": r.credentials_revoked,
                    "cursor": (r.cursor > 0).then_some(r.cursor),
                });
                writeln!(out, "{doc}")
            } else if r.already_revoked && kind == "identity" {
                writeln!(
                    out,
                    "{kind} {what}: held no live task or credential; nothing to revoke"
                )
            } else if r.already_revoked {
                writeln!(out, "{kind} {what}: nothing to revoke (already revoked or ended)")
            } else if kind == "identity" {
                writeln!(
                    out,
                    "{kind} {what}: revoked {} task(s) and {} credential(s) in one event (cursor {}){}{}",
                    r.task_ids.len(),
                    r.credentials_revoked,
                    r.cursor,
                    if r.task_ids.is_empty() { "" } else { ": " },
                    r.task_ids.join(", ")
                )
            } else {
                writeln!(out, "{kind} {what}: revoked")
            }
            .context("writing to stdout")?;
            Ok(())
        }
        AdminCommand::Policy {
            command: AdminPolicyCommand::Reload { json, admin },
        } => {
            let r = admin_client(&admin)
                .await?
                .reload_policy(admin.request(ReloadPolicyRequest {})?)
                .await?
                .into_inner();
            if json {
                let doc = serde_json::json!({
                    "policies": r.policies,
                    "tasks_decided": r.tasks_decided,
                    "grants_decided": r.grants_decided,
                    "credentials_decided": r.credentials_decided,
                    "tasks_revoked": r.tasks_revoked,
                    "credentials_revoked": r.credentials_revoked,
                    "cursor": r.cursor,
                    "redecide_ms": r.redecide_ms,
                });
                writeln!(out, "{doc}")
            } else {
                writeln!(
                    out,
                    "policies reloaded: {} serving; decided again: {} task(s), {} credential(s) in {} grant(s) in {} ms; revoked: {} task(s), {} credential(s){}",
                    r.policies,
                    r.tasks_decided,
                    r.credentials_decided,
                    r.grants_decided,
                    r.redecide_ms,
                    r.tasks_revoked.len(),
                    r.credentials_revoked,
                    if r.cursor > 0 { format!(" (cursor {})", r.cursor) } else { String::new() }
                )
            }
            .context("writing to stdout")?;
            Ok(())
        }
        AdminCommand::Lock { command } => lock(command, &mut out).await,
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
            let resp = admin_client(&args.admin)
                .await?
                .create_join_token(req)
                .await?
                .into_inner();
            if args.json {
                let doc = serde_json::json!({
                    "token": resp.token,
                    "id": resp.id,
                    "expires_at": rfc3339(resp.expires_at),
                });
                writeln!(out, "{doc}")
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

fn lock_json(l: &LockInfo) -> serde_json::Value {
    serde_json::json!({
        "id": l.id,
        "target": l.target,
        "reason": l.reason,
        "created_by": l.created_by,
        "created_at": time_json(l.created_at),
        "expires_at": time_json(l.expires_at),
        "active": l.active,
    })
}

/// `ephemera admin lock ...`
async fn lock(cmd: LockCommand, out: &mut impl Write) -> Result<(), Failure> {
    match cmd {
        LockCommand::Create {
            target,
            reason,
            ttl,
            json,
            admin,
        } => {
            let req = admin.request(CreateLockRequest {
                target,
                reason,
                ttl_seconds: ttl_secs(ttl.as_deref())?,
            })?;
            let r = admin_client(&admin)
                .await?
                .create_lock(req)
                .await?
                .into_inner();
            let l = r.lock.unwrap_or_default();
            if json {
                let mut doc = lock_json(&l);
                doc["task_ids"] = r.task_ids.clone().into();
                doc["credentials_revoked"] = r.credentials_revoked.into();
                doc["cursor"] = r.cursor.into();
                writeln!(out, "{doc}")
            } else {
                writeln!(
                    out,
                    "lock {} on {}: revoked {} task(s) and {} credential(s) (cursor {}){}",
                    l.id,
                    l.target,
                    r.task_ids.len(),
                    r.credentials_revoked,
                    r.cursor,
                    if l.expires_at > 0 {
                        format!("; expires {}", rfc3339(l.expires_at))
                    } else {
                        "; until deleted".to_owned()
                    }
                )
            }
            .context("writing to stdout")?;
        }
        LockCommand::List { json, admin } => {
            let r = admin_client(&admin)
                .await?
                .list_locks(admin.request(ListLocksRequest {})?)
                .await?
                .into_inner();
            if json {
                for l in &r.locks {
                    writeln!(out, "{}", lock_json(l)).context("writing to stdout")?;
                }
            } else {
                let rows: Vec<Vec<String>> = r
                    .locks
                    .iter()
                    .map(|l| {
                        vec![
                            l.id.clone(),
                            l.target.clone(),
                            if l.active { "active" } else { "expired" }.to_owned(),
                            if l.expires_at > 0 {
                                rfc3339(l.expires_at)
                            } else {
                                "-".to_owned()
                            },
                            l.reason.clone(),
                        ]
                    })
                    .collect();
                table(out, &["ID", "TARGET", "STATE", "EXPIRES", "REASON"], &rows)
                    .context("writing to stdout")?;
            }
        }
        LockCommand::Delete { id, admin } => {
            let r = admin_client(&admin)
                .await?
                .delete_lock(admin.request(DeleteLockRequest { id: id.clone() })?)
                .await?
                .into_inner();
            if r.deleted {
                writeln!(out, "lock {id}: deleted")
            } else {
                writeln!(out, "lock {id}: no such lock")
            }
            .context("writing to stdout")?;
        }
    }
    Ok(())
}
