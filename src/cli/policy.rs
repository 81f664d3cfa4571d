//! `ephemera policy`: validate a policy directory, explain a decision, print the schema.
//!
//! These run locally against policy files; no broker is needed.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde::Deserialize;

use super::{EXIT_DENIED, EXIT_USAGE, Failure};
use crate::id::SpiffeId;
use crate::policy::cedar::{
    Action, BehaviourContext, PolicyEngine, Principal, RequestContext, Resource, SCHEMA,
    TaskContext,
};

/// `ephemera policy ...`
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Parse and validate every *.cedar file in a directory against the schema.
    Check {
        /// Policy directory.
        #[command(flatten)]
        dir: DirArgs,
        /// Accept a directory holding no policy (the broker then denies everything).
        #[arg(long)]
        allow_empty: bool,
        /// Print JSON: {"dir", "policies", "valid", "problems": [{"file", "line", "message"}]}.
        #[arg(long)]
        json: bool,
    },
    /// Decide one request described in a JSON file and print what determined the decision.
    /// Exits 0 when allowed, 77 when denied.
    Explain {
        /// The request: {"principal": {"spiffe_id", "attestor", "claims"}, "action",
        /// "resource": {"audience"} or {"target"}, "context": {...}}.
        #[arg(long)]
        request: PathBuf,
        /// Policy directory.
        #[command(flatten)]
        dir: DirArgs,
    },
    /// Print the Cedar schema policies are validated against.
    Schema,
}

/// Where the policies are.
#[derive(Debug, Args)]
pub struct DirArgs {
    /// Directory of *.cedar policy files.
    #[arg(long, default_value = ".ephemera/policies")]
    pub dir: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExplainRequest {
    principal: ExplainPrincipal,
    action: String,
    resource: ExplainResource,
    #[serde(default)]
    context: ExplainContext,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExplainPrincipal {
    spiffe_id: String,
    attestor: String,
    #[serde(default)]
    claims: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
enum ExplainResource {
    Audience(String),
    Target(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExplainContext {
    source_ip: Option<IpAddr>,
    #[serde(default)]
    requested_ttl_secs: u64,
    #[serde(default)]
    evidence_age_secs: u64,
    /// RFC 3339; default now.
    now: Option<String>,
    task: Option<ExplainTask>,
    behaviour: Option<ExplainBehaviour>,
}

/// `context.behaviour`, as a policy would see it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExplainBehaviour {
    #[serde(default)]
    issued_last_minute: u64,
    #[serde(default)]
    denials_last_10_minutes: u64,
    #[serde(default)]
    live_tasks: u64,
    #[serde(default)]
    task_leases: u64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExplainTask {
    id: String,
    #[serde(default)]
    labels: Vec<String>,
    #[serde(default)]
    scopes: Vec<String>,
    #[serde(default)]
    age_secs: u64,
}

fn load(dir: &Path) -> Result<PolicyEngine, Failure> {
    PolicyEngine::load(dir).map_err(|problems| {
        let list: Vec<String> = problems.iter().map(|p| format!("  {p}")).collect();
        Failure::new(
            EXIT_USAGE,
            anyhow::anyhow!(
                "{} problem(s) in {}:\n{}",
                problems.len(),
                dir.display(),
                list.join("\n")
            ),
        )
    })
}

/// `ephemera policy check`: a missing directory, or one without a policy, fails (a gate with a
/// typo in its path must not pass a broker that would deny everything).
fn check(dir: &Path, allow_empty: bool, json: bool, out: &mut impl Write) -> Result<(), Failure> {
    let fail = |message: String, problems: Vec<serde_json::Value>, out: &mut dyn Write| {
        if json {
            let doc = serde_json::json!({
                "dir": dir.display().to_string(),
                "policies": 0,
                "valid": false,
                "problems": problems,
            });
            let _ = writeln!(out, "{doc}");
        }
        Err(Failure::new(EXIT_USAGE, anyhow::anyhow!("{message}")))
    };
    match std::fs::metadata(dir) {
        Err(e) => {
            let message = format!("{}: {}", dir.display(), e);
            return fail(
                message.clone(),
                vec![
                    serde_json::json!({"file": dir.display().to_string(), "line": null, "message": message}),
                ],
                out,
            );
        }
        Ok(m) if !m.is_dir() => {
            let message = format!("{}: not a directory", dir.display());
            return fail(
                message.clone(),
                vec![
                    serde_json::json!({"file": dir.display().to_string(), "line": null, "message": "not a directory"}),
                ],
                out,
            );
        }
        Ok(_) => {}
    }
    let engine = match PolicyEngine::load(dir) {
        Ok(e) => e,
        Err(problems) => {
            let list: Vec<serde_json::Value> = problems
                .iter()
                .map(|p| {
                    serde_json::json!({
                        "file": p.file.display().to_string(),
                        "line": p.line,
                        "message": p.message,
                    })
                })
                .collect();
            let text: Vec<String> = problems.iter().map(|p| format!("  {p}")).collect();
            return fail(
                format!(
                    "{} problem(s) in {}:\n{}",
                    problems.len(),
                    dir.display(),
                    text.join("\n")
                ),
                list,
                out,
            );
        }
    };
    if engine.count() == 0 && !allow_empty {
        let message = format!(
            "{}: no policies (*.cedar); the broker would deny every request (pass --allow-empty if that is intended)",
            dir.display()
        );
        return fail(
            message,
            vec![
                serde_json::json!({"file": dir.display().to_string(), "line": null, "message": "no policies"}),
            ],
            out,
        );
    }
    if json {
        let doc = serde_json::json!({
            "dir": dir.display().to_string(),
            "policies": engine.count(),
            "valid": true,
            "problems": [],
        });
        writeln!(out, "{doc}")
    } else {
        writeln!(out, "{}: {} policies, valid", dir.display(), engine.count())
    }
    .context("writing to stdout")?;
    Ok(())
}

fn usage(e: impl std::fmt::Display) -> Failure {
    Failure::new(EXIT_USAGE, anyhow::anyhow!("{e}"))
}

/// Runs `ephemera policy ...`.
pub fn run(cmd: PolicyCommand) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    match cmd {
        PolicyCommand::Schema => {
            write!(out, "{SCHEMA}").context("writing to stdout")?;
            Ok(())
        }
        PolicyCommand::Check {
            dir: DirArgs { dir },
            allow_empty,
            json,
        } => check(&dir, allow_empty, json, &mut out),
        PolicyCommand::Explain { request, dir } => {
            let engine = load(&dir.dir)?;
            let text = std::fs::read(&request)
                .with_context(|| format!("reading {}", request.display()))
                .map_err(|e| Failure::new(EXIT_USAGE, e))?;
            let req: ExplainRequest = serde_json::from_slice(&text)
                .map_err(|e| usage(format!("{}: {e}", request.display())))?;
            let spiffe_id: SpiffeId = req
                .principal
                .spiffe_id
                .parse()
                .map_err(|e| usage(format!("principal.spiffe_id: {e}")))?;
            let action = Action::parse(&req.action).ok_or_else(|| {
                usage(format!(
                    "action {:?}: use BeginTask, MintX509Svid or MintJwtSvid",
                    req.action
                ))
            })?;
            let resource = match req.resource {
                ExplainResource::Audience(a) => Resource::Audience(a),
                ExplainResource::Target(t) => Resource::Target(t),
            };
            let now = match &req.context.now {
                None => SystemTime::now(),
                Some(s) => {
                    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                        .map(SystemTime::from)
                        .map_err(|e| usage(format!("context.now: {e}")))?
                }
            };
            let ctx = RequestContext {
                source_ip: req.context.source_ip,
                requested_ttl_secs: req.context.requested_ttl_secs,
                evidence_age_secs: req.context.evidence_age_secs,
                now,
                task: req.context.task.map(|t| TaskContext {
                    id: t.id,
                    labels: t.labels,
                    scopes: t.scopes,
                    age_secs: t.age_secs,
                }),
                behaviour: req.context.behaviour.map(|b| BehaviourContext {
                    issued_last_minute: b.issued_last_minute,
                    denials_last_10_minutes: b.denials_last_10_minutes,
                    live_tasks: b.live_tasks,
                    task_leases: b.task_leases,
                }),
            };
            let principal = Principal {
                spiffe_id: &spiffe_id,
                attestor: &req.principal.attestor,
                claims: &req.principal.claims,
            };
            let d = engine
                .decide(&principal, action, &resource, &ctx)
                .map_err(usage)?;
            let verdict = if d.allowed { "ALLOW" } else { "DENY" };
            writeln!(out, "{verdict}").context("writing to stdout")?;
            if d.allowed {
                writeln!(out, "  permitted by: {}", d.policies.join(", "))
            } else {
                writeln!(out, "  reason: {}", d.deny_reason())
            }
            .context("writing to stdout")?;
            for e in &d.errors {
                writeln!(out, "  evaluation error (policy skipped): {e}")
                    .context("writing to stdout")?;
            }
            if d.allowed {
                Ok(())
            } else {
                Err(Failure::new(EXIT_DENIED, anyhow::anyhow!("denied")))
            }
        }
    }
}
