//! `ephemera-bench`: issuance throughput and latency, revocation propagation and lease scale,
//! with the single-core signing rate measured in the same run as the yardstick.
//!
//! ```text
//! cargo run --release -p ephemera-bench              # everything, in-process broker
//! cargo run --release -p ephemera-bench -- --json    # the same as JSON
//! cargo run --release -p ephemera-bench -- --smoke   # seconds, for the test suite
//! ephemera-bench --only issuance --socket /run/ephemera/broker.sock --broker-pid 1234
//! ```
//!
//! In-process, the broker runs on its own runtime (threads named `ephemera-broker`) and clients
//! reach it over real sockets, so broker CPU is read from `/proc` per thread. Against a running
//! broker, `--broker-pid` gives its CPU; `--token-file` gives evidence for TCP.
#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    reason = "a command-line program reporting results"
)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use clap::Parser;
use ephemera::api::pb::v1::admin_client::AdminClient;
use ephemera::api::pb::v1::broker_client::BrokerClient;
use ephemera::api::pb::v1::revocations_client::RevocationsClient;
use ephemera::api::pb::v1::{
    BeginTaskRequest, EndTaskRequest, KeepAliveRequest, ListLeasesRequest, MintJwtSvidRequest,
    MintX509SvidRequest, ReloadPolicyRequest, RevokeTaskRequest, WatchRequest,
};
use ephemera::api::pb::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use ephemera::api::pb::workload::{JwtsvidRequest, X509svidRequest};
use ephemera::client::ConnectOptions;
use ephemera::client::evidence::{Evidence, Source};
use ephemera::dev::DevOptions;
use ephemera::store::{Lease, LeaseKind, Store, StoredPrincipal, Task, TaskState};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

mod issuance;
mod lease_scale;
mod procfs;
mod report;
mod revocation;
mod soak;
mod target;

pub(crate) use issuance::*;
pub(crate) use lease_scale::*;
pub(crate) use procfs::*;
pub(crate) use report::*;
pub(crate) use revocation::*;
pub(crate) use soak::*;
pub(crate) use target::*;

/// What to measure and where.
#[derive(Debug, Parser)]
#[command(name = "ephemera-bench", version, about)]
struct Args {
    /// Concurrent clients for issuance.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Seconds measured per issuance scenario (after a 1s warm-up).
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Tasks per revocation trigger.
    #[arg(long, default_value_t = 200)]
    revocations: usize,
    /// Live leases for the lease-scale run.
    #[arg(long, default_value_t = 1_000_000)]
    leases: usize,
    /// Tasks the leases are spread across.
    #[arg(long, default_value_t = 100_000)]
    tasks: usize,
    /// Seconds of reaper CPU sampling in the lease-scale run.
    #[arg(long, default_value_t = 60.0)]
    reaper_seconds: f64,
    /// Everything small: a few seconds in all (the test suite runs this).
    #[arg(long)]
    smoke: bool,
    /// Only these parts: issuance, revocation, lease-scale (repeatable).
    #[arg(long)]
    only: Vec<String>,
    /// Only these issuance cases, as transport:credential (tcp|unix : csr|keygen|jwt, or
    /// workload : keygen|jwt for the SPIFFE Workload API; repeatable), e.g. `--case unix:jwt`
    /// to profile one.
    #[arg(long)]
    case: Vec<String>,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
    /// A running broker's Unix socket (issuance only).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// A running broker's SPIFFE Workload API socket (issuance only).
    #[arg(long)]
    workload_socket: Option<PathBuf>,
    /// A running broker's TCP address (issuance only; needs --ca-file and --token-file).
    #[arg(long)]
    addr: Option<String>,
    /// Trust anchors for --addr.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// A bearer token (OIDC) to present over TCP to a running broker.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// The running broker's pid, for its CPU time.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// Soak instead of measuring: this many seconds of mixed load against a broker process,
    /// sampling its RSS and open file descriptors (the issue's long mode is 600).
    #[arg(long, value_name = "SECONDS")]
    soak: Option<f64>,
    /// PostgreSQL server URL (default: SQLite): each part of the run (issuance and revocation,
    /// lease scale, soak) gets a fresh database there, dropped when the part ends.
    #[arg(long, env = "EPHEMERA_BENCH_POSTGRES_URL")]
    store_url: Option<String>,
    /// Where the in-process broker's log goes (default: an unnamed temporary file, gone when
    /// the run ends). It logs as a deployed broker does: `info`, JSON lines, one write per line,
    /// so every credential's cost includes its audit event.
    #[arg(long, value_name = "FILE")]
    broker_log: Option<PathBuf>,
}

impl Args {
    fn wants(&self, part: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|o| o == part)
    }

    fn wants_case(&self, t: Transport, kind: Kind) -> bool {
        let name = format!(
            "{}:{}",
            t.name(),
            match kind {
                Kind::X509Csr => "csr",
                Kind::X509Keygen => "keygen",
                Kind::Jwt => "jwt",
            }
        );
        self.case.is_empty() || self.case.contains(&name)
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let mut args = Args::parse();
    if args.smoke {
        args.clients = args.clients.min(4);
        args.seconds = args.seconds.min(1.0);
        args.revocations = args.revocations.min(5);
        args.leases = args.leases.min(20_000);
        args.tasks = args.tasks.min(2_000);
        args.reaper_seconds = args.reaper_seconds.min(1.0);
    }
    if let Err(e) = broker_log(args.broker_log.as_deref()) {
        eprintln!("error: the broker's log: {e:#}");
        return std::process::ExitCode::FAILURE;
    }
    match run(&args).await {
        Ok(report) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                print_table(&report);
            }
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// A database of its own on the `--store-url` server for one part of the run, so no earlier
/// run's leases (nor the CRL they make) weigh on it; `None` for SQLite.
struct PartStore(Option<String>);

impl PartStore {
    async fn new(server: Option<&str>) -> anyhow::Result<Self> {
        Ok(Self(match server {
            Some(s) => Some(
                ephemera::store::postgres::testing::fresh_database(s)
                    .await
                    .map_err(|e| anyhow::anyhow!(e))?,
            ),
            None => None,
        }))
    }

    fn url(&self) -> Option<&str> {
        self.0.as_deref()
    }

    async fn drop(self) -> anyhow::Result<()> {
        if let Some(url) = self.0 {
            ephemera::store::postgres::testing::drop_database(&url)
                .await
                .map_err(|e| anyhow::anyhow!(e))?;
        }
        Ok(())
    }
}

async fn run(args: &Args) -> anyhow::Result<Value> {
    let remote_target = args.socket.is_some() || args.addr.is_some();
    if let Some(seconds) = args.soak {
        let store = PartStore::new(args.store_url.as_deref()).await?;
        let soaked = soak(seconds, store.url()).await;
        store.drop().await?;
        return Ok(json!({
            "machine": machine(),
            "soak": soaked?,
        }));
    }
    let sign_rate = signing_rate(if args.smoke { 0.2 } else { 2.0 })?;
    let mut report = json!({
        "machine": machine(),
        "settings": {
            "clients": args.clients, "seconds": args.seconds, "revocations": args.revocations,
            "smoke": args.smoke,
            "broker": if remote_target { "running" } else { "in-process" },
            "store": if args.store_url.is_some() { "postgresql" } else { "sqlite" },
            "broker_log": if remote_target { "the running broker's" } else { "info, JSON lines, to a file" },
        },
        "signing": { "es256_per_second": sign_rate.round(), "es256_us": ((1e6 / sign_rate) * 10.0).round() / 10.0 },
    });
    if args.wants("issuance") || args.wants("revocation") {
        let store = PartStore::new(args.store_url.as_deref().filter(|_| !remote_target)).await?;
        let target = Arc::new(if remote_target {
            remote(args)?
        } else {
            in_process(store.url()).await?
        });
        let measured = async {
            if args.wants("issuance") {
                report["issuance"] = issuance(&target, args, sign_rate).await?;
            }
            if args.wants("revocation") && !remote_target {
                report["revocation"] = revocation(&target, args.revocations).await?;
            }
            anyhow::Ok(())
        }
        .await;
        // The broker's runtime cannot be dropped inside ours (also when a part failed).
        if let Ok(t) = Arc::try_unwrap(target) {
            tokio::task::spawn_blocking(move || drop(t)).await?;
        }
        store.drop().await?;
        measured?;
    }
    if args.wants("lease-scale") && !remote_target {
        let store = PartStore::new(args.store_url.as_deref()).await?;
        let scaled = lease_scale(args, store.url()).await;
        store.drop().await?;
        report["lease_scale"] = scaled?;
    }
    Ok(report)
}
