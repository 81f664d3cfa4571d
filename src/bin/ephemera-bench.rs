//! `ephemera-bench`: issuance throughput and latency, revocation propagation and lease scale,
//! with the single-core signing rate measured in the same run as the yardstick.
//!
//! ```text
//! cargo run --release --bin ephemera-bench              # everything, in-process broker
//! cargo run --release --bin ephemera-bench -- --json    # the same as JSON
//! cargo run --release --bin ephemera-bench -- --smoke   # seconds, for the test suite
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
    MintX509SvidRequest, RevokeTaskRequest, WatchRequest,
};
use ephemera::api::pb::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use ephemera::api::pb::workload::{JwtsvidRequest, X509svidRequest};
use ephemera::client::ConnectOptions;
use ephemera::client::evidence::{Evidence, Source};
use ephemera::dev::DevOptions;
use ephemera::store::{Lease, LeaseKind, Store, Task, TaskState};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

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

// ---------------------------------------------------------------------------------------------
// CPU accounting from /proc

/// CPU seconds used by threads of `pid` whose name starts with one of `prefixes` (all threads
/// when `prefixes` is empty).
fn cpu_seconds(pid: u32, prefixes: &[&str]) -> f64 {
    threads_cpu_seconds(pid, prefixes).unwrap_or(0.0)
}

/// Like [`cpu_seconds`], but `None` when no thread matches.
fn threads_cpu_seconds(pid: u32, prefixes: &[&str]) -> Option<f64> {
    let ticks = 100.0; // USER_HZ on Linux
    let dir = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = 0u64;
    let mut matched = false;
    for entry in dir.flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ... : comm may hold spaces, so split at the last ')'.
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let comm = head.split_once('(').map_or("", |(_, c)| c);
        if !prefixes.is_empty() && !prefixes.iter().any(|p| comm.starts_with(p)) {
            continue;
        }
        matched = true;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // After ')': state is field 3 of the line, utime 14 and stime 15 → indexes 11 and 12.
        let utime: u64 = fields.get(11).and_then(|f| f.parse().ok()).unwrap_or(0);
        let stime: u64 = fields.get(12).and_then(|f| f.parse().ok()).unwrap_or(0);
        total += utime + stime;
    }
    matched.then(|| total as f64 / ticks)
}

/// Resident set size of `pid`, in MiB (current and peak).
fn rss_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Where the broker's CPU is read from.
#[derive(Clone)]
struct BrokerCpu {
    pid: Option<u32>,
    prefixes: Vec<&'static str>,
}

/// The threads of a SQLite store: sqlx runs each SQLite connection on a thread of its own.
const SQLITE_THREADS: &[&str] = &["sqlx-sqlite-wor"];

impl BrokerCpu {
    fn read(&self) -> Option<f64> {
        self.pid.map(|p| {
            let prefixes: Vec<&str> = self.prefixes.clone();
            cpu_seconds(p, &prefixes)
        })
    }

    /// CPU seconds of the broker's SQLite threads (part of [`Self::read`]); `None` when it has
    /// none (a broker on PostgreSQL).
    fn read_sqlite(&self) -> Option<f64> {
        threads_cpu_seconds(self.pid?, SQLITE_THREADS)
    }
}

// ---------------------------------------------------------------------------------------------
// Statistics

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn latency_json(mut v: Vec<Duration>) -> Value {
    v.sort();
    json!({
        "samples": v.len(),
        "p50_ms": ms(percentile(&v, 50.0)),
        "p90_ms": ms(percentile(&v, 90.0)),
        "p99_ms": ms(percentile(&v, 99.0)),
        "max_ms": ms(v.last().copied().unwrap_or_default()),
    })
}

// ---------------------------------------------------------------------------------------------
// The yardstick: single-core ES256 signing with ring

fn signing_rate(seconds: f64) -> anyhow::Result<f64> {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
        .map_err(|_| anyhow!("key generation"))?;
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
        .map_err(|_| anyhow!("key parsing"))?;
    // The size of a JWT-SVID signing input.
    let msg = [b'x'; 300];
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed().as_secs_f64() < seconds {
        for _ in 0..100 {
            key.sign(&rng, &msg).map_err(|_| anyhow!("signing"))?;
        }
        n += 100;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

// ---------------------------------------------------------------------------------------------
// The broker under test

/// A local OIDC issuer whose token authenticates TCP clients of the in-process broker.
struct BenchIssuer {
    jwks: String,
    token: String,
}

const BENCH_ISSUER: &str = "https://bench.ephemera.invalid";
const BENCH_AUDIENCE: &str = "ephemera-bench";

impl BenchIssuer {
    fn new() -> anyhow::Result<Self> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| anyhow!("issuer key"))?;
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .map_err(|_| anyhow!("issuer key"))?;
        let pt = key.public_key().as_ref();
        let jwks = json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "bench", "alg": "ES256",
            "x": URL_SAFE_NO_PAD.encode(&pt[1..33]), "y": URL_SAFE_NO_PAD.encode(&pt[33..])}]})
        .to_string();
        let now = unix_now();
        let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"ES256","kid":"bench","typ":"JWT"}"#);
        let claims = URL_SAFE_NO_PAD.encode(
            json!({"iss": BENCH_ISSUER, "aud": BENCH_AUDIENCE, "sub": "bench-client",
                   "iat": now, "nbf": now, "exp": now + 6 * 3600})
            .to_string(),
        );
        let input = format!("{header}.{claims}");
        let sig = key
            .sign(&rng, input.as_bytes())
            .map_err(|_| anyhow!("signing"))?;
        Ok(Self {
            jwks,
            token: format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig)),
        })
    }
}

/// The broker the issuance and revocation runs talk to.
struct Target {
    socket: PathBuf,
    workload_socket: Option<PathBuf>,
    tcp: Option<(String, PathBuf)>,
    http: Option<String>,
    tcp_evidence: Option<Evidence>,
    admin_token: Option<String>,
    cpu: BrokerCpu,
    // Kept alive for the run.
    _runtime: Option<tokio::runtime::Runtime>,
    _running: Option<ephemera::app::Running>,
    _dir: Option<tempfile::TempDir>,
}

fn store_config(url: Option<&str>) -> String {
    url.map(|u| {
        format!(
            "\n[store]\nurl = {}\nmax_connections = 8\n",
            toml::Value::String(u.to_owned())
        )
    })
    .unwrap_or_default()
}

/// Starts a broker on its own runtime (threads named `ephemera-broker`).
async fn in_process(store_url: Option<&str>) -> anyhow::Result<Target> {
    let dir = tempfile::tempdir()?;
    let issuer = BenchIssuer::new()?;
    let jwks_path = dir.path().join("bench-jwks.json");
    std::fs::write(&jwks_path, &issuer.jwks)?;
    let mut opts = DevOptions::embedded(dir.path().join("data"));
    // Where its lines go is set for the whole run (`broker_log`); this is the config's filter.
    opts.log_level = "info".into();
    opts.extra_config = format!(
        r#"
[tasks]
heartbeat_interval = "1s"
grace = "1s"

# One identity drives every client here: no per-identity quotas.
[limits]
requests_per_second = 0
max_active_tasks_per_identity = 0
max_leases_per_task = 0

[[oidc]]
issuer = "{BENCH_ISSUER}"
jwks_file = {jwks}
audiences = ["{BENCH_AUDIENCE}"]
max_token_age = "7h"

[[mapping]]
attestor = "oidc"
spiffe_id = "spiffe://{{trust_domain}}/bench/{{claims.sub}}"
match = {{ iss = "{BENCH_ISSUER}" }}
{store}"#,
        jwks = toml::Value::String(jwks_path.to_string_lossy().into_owned()),
        store = store_config(store_url),
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("ephemera-broker")
        .enable_all()
        .build()?;
    let running = runtime.spawn(async move { opts.start().await }).await??;
    let e = running.endpoints.clone();
    let admin_token = e
        .admin_token_file
        .as_ref()
        .and_then(|f| std::fs::read_to_string(f).ok())
        .map(|t| t.trim().to_owned());
    Ok(Target {
        socket: e.broker_socket.clone(),
        workload_socket: e.workload_socket.clone(),
        tcp: Some((e.grpc_addr.clone(), e.ca_bundle.clone())),
        http: Some(e.http_addr.clone()),
        tcp_evidence: Some(Evidence::bearer(
            Source::TokenFile("bench".into()),
            &issuer.token,
        )?),
        admin_token,
        cpu: BrokerCpu {
            pid: Some(std::process::id()),
            prefixes: [&["ephemera-broke"], SQLITE_THREADS].concat(),
        },
        _runtime: Some(runtime),
        _running: Some(running),
        _dir: Some(dir),
    })
}

fn remote(args: &Args) -> anyhow::Result<Target> {
    let tcp_evidence = match &args.token_file {
        Some(f) => Some(Evidence::bearer(
            Source::TokenFile(f.clone()),
            &std::fs::read_to_string(f)?,
        )?),
        None => None,
    };
    let tcp = match (&args.addr, &args.ca_file) {
        (Some(a), Some(c)) => Some((a.clone(), c.clone())),
        (Some(_), None) => bail!("--addr needs --ca-file"),
        _ => None,
    };
    Ok(Target {
        socket: args.socket.clone().unwrap_or_default(),
        workload_socket: args.workload_socket.clone(),
        tcp,
        http: None,
        tcp_evidence,
        admin_token: None,
        cpu: BrokerCpu {
            pid: args.broker_pid,
            prefixes: vec![],
        },
        _runtime: None,
        _running: None,
        _dir: None,
    })
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Transport {
    /// The broker API over TLS on loopback TCP.
    Tcp,
    /// The broker API on its Unix socket.
    Unix,
    /// The SPIFFE Workload API on its Unix socket.
    Workload,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Unix => "unix",
            Self::Workload => "workload",
        }
    }
}

impl Target {
    async fn channel(&self, t: Transport) -> anyhow::Result<Channel> {
        let opts = match t {
            Transport::Unix => ConnectOptions {
                socket: Some(self.socket.clone()),
                ..ConnectOptions::default()
            },
            Transport::Workload => ConnectOptions {
                socket: Some(
                    self.workload_socket
                        .clone()
                        .context("no Workload API socket")?,
                ),
                ..ConnectOptions::default()
            },
            Transport::Tcp => {
                let (addr, ca) = self.tcp.clone().context("no TCP address")?;
                ConnectOptions {
                    addr: Some(addr),
                    ca_file: Some(ca),
                    ..ConnectOptions::default()
                }
            }
        };
        Ok(opts.connect().await?)
    }

    fn request<T>(&self, t: Transport, msg: T) -> tonic::Request<T> {
        match (t, &self.tcp_evidence) {
            (Transport::Tcp, Some(ev)) => ev.request(msg),
            _ => tonic::Request::new(msg),
        }
    }

    fn admin<T>(&self, msg: T) -> anyhow::Result<tonic::Request<T>> {
        let token = self.admin_token.as_ref().context("no admin token")?;
        let mut req = tonic::Request::new(msg);
        req.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse()?);
        Ok(req)
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Issuance

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    X509Csr,
    X509Keygen,
    Jwt,
}

impl Kind {
    fn name(self, transport: Transport) -> &'static str {
        match (self, transport) {
            (Self::X509Csr, _) => "x509-svid (CSR)",
            (Self::X509Keygen, Transport::Workload) => "x509-svid (stream+task)",
            (Self::X509Keygen, _) => "x509-svid (broker key)",
            (Self::Jwt, _) => "jwt-svid",
        }
    }
}

/// The timed part of an issuance run: requests started before `start` are warm-up.
#[derive(Clone, Copy)]
struct Window {
    start: tokio::time::Instant,
    end: tokio::time::Instant,
}

impl Window {
    /// Starts after a warm-up of a fifth of `seconds` (at most 1 s) from now.
    fn after_warmup(seconds: f64) -> Self {
        let warmup = Duration::from_secs_f64((seconds / 5.0).min(1.0));
        let start = tokio::time::Instant::now() + warmup;
        Self {
            start,
            end: start + Duration::from_secs_f64(seconds),
        }
    }

    /// When the next request starts, or `None` once the window has closed.
    fn next(&self) -> Option<tokio::time::Instant> {
        let t0 = tokio::time::Instant::now();
        (t0 < self.end).then_some(t0)
    }
}

/// One client's requests inside the window: latencies of those that succeeded, and failures.
#[derive(Default)]
struct Tally {
    latencies: Vec<Duration>,
    errors: u64,
}

impl Tally {
    fn record(&mut self, window: &Window, t0: tokio::time::Instant, ok: bool) {
        if t0 < window.start {
            return;
        }
        if ok {
            self.latencies.push(t0.elapsed());
        } else {
            self.errors += 1;
        }
    }
}

/// Broker API clients: each with its own connection and task, kept alive, ready before the
/// window opens. Returns the clients' workers and the keep-alive senders to stop afterwards.
async fn broker_clients(
    target: &Arc<Target>,
    transport: Transport,
    kind: Kind,
    clients: usize,
    seconds: f64,
    csrs: &Arc<Vec<Vec<u8>>>,
) -> anyhow::Result<(
    Window,
    Vec<tokio::task::JoinHandle<Tally>>,
    Vec<tokio::task::JoinHandle<()>>,
)> {
    let mut setups = Vec::new();
    let mut keepers = Vec::new();
    for _ in 0..clients {
        let channel = target.channel(transport).await?;
        let mut client = BrokerClient::new(channel);
        let task = client
            .begin_task(target.request(transport, BeginTaskRequest::default()))
            .await?
            .into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tx.send(KeepAliveRequest {
            task_id: task.task_id.clone(),
        })
        .await?;
        let stream = client
            .keep_alive(target.request(transport, tokio_stream::wrappers::ReceiverStream::new(rx)))
            .await?;
        let every = Duration::from_secs(task.heartbeat_interval_seconds.max(1)) / 2;
        keepers.push(tokio::spawn(async move {
            let _stream = stream;
            loop {
                tokio::time::sleep(every).await;
                if tx.send(KeepAliveRequest::default()).await.is_err() {
                    return;
                }
            }
        }));
        setups.push((client, task.task_id));
    }
    let window = Window::after_warmup(seconds);
    let mut workers = Vec::new();
    for (i, (mut client, task_id)) in setups.into_iter().enumerate() {
        let (target, csrs) = (target.clone(), csrs.clone());
        workers.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            let mut n = i;
            while let Some(t0) = window.next() {
                let ok = match kind {
                    Kind::Jwt => client
                        .mint_jwt_svid(target.request(
                            transport,
                            MintJwtSvidRequest {
                                audience: vec!["bench".into()],
                                task_id: task_id.clone(),
                                ..MintJwtSvidRequest::default()
                            },
                        ))
                        .await
                        .is_ok(),
                    Kind::X509Csr | Kind::X509Keygen => client
                        .mint_x509_svid(target.request(
                            transport,
                            MintX509SvidRequest {
                                csr: if kind == Kind::X509Csr {
                                    csrs[n % csrs.len()].clone()
                                } else {
                                    Vec::new()
                                },
                                task_id: task_id.clone(),
                                ..MintX509SvidRequest::default()
                            },
                        ))
                        .await
                        .is_ok(),
                };
                n += clients;
                tally.record(&window, t0, ok);
            }
            let _ = client
                .end_task(target.request(transport, EndTaskRequest { task_id }))
                .await;
            tally
        }));
    }
    Ok((window, workers, keepers))
}

/// A Workload API request: the security header every call must carry.
fn workload_request<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(
        ephemera::api::workload::HEADER,
        tonic::metadata::MetadataValue::from_static("true"),
    );
    req
}

/// SPIFFE Workload API clients, each on its own connection, attested by its peer credentials
/// like any workload. JWT: `FetchJWTSVID` calls. X.509: a workload starting up, over and over:
/// open `FetchX509SVID` (a task begins and an SVID is minted with a broker key), wait for the
/// first response, close the stream (the task ends and the SVID is revoked).
async fn workload_clients(
    target: &Arc<Target>,
    kind: Kind,
    clients: usize,
    seconds: f64,
) -> anyhow::Result<(Window, Vec<tokio::task::JoinHandle<Tally>>)> {
    let mut channels = Vec::new();
    for _ in 0..clients {
        channels.push(target.channel(Transport::Workload).await?);
    }
    let window = Window::after_warmup(seconds);
    let workers = channels
        .into_iter()
        .map(|channel| {
            let mut client = SpiffeWorkloadApiClient::new(channel);
            tokio::spawn(async move {
                let mut tally = Tally::default();
                while let Some(t0) = window.next() {
                    let ok = match kind {
                        Kind::Jwt => client
                            .fetch_jwtsvid(workload_request(JwtsvidRequest {
                                audience: vec!["bench".into()],
                                spiffe_id: String::new(),
                            }))
                            .await
                            .is_ok_and(|r| r.get_ref().svids.iter().any(|s| !s.svid.is_empty())),
                        Kind::X509Csr | Kind::X509Keygen => {
                            match client
                                .fetch_x509svid(workload_request(X509svidRequest {}))
                                .await
                            {
                                Ok(r) => r.into_inner().message().await.is_ok_and(|m| {
                                    m.is_some_and(|m| {
                                        m.svids.iter().any(|s| {
                                            !s.x509_svid.is_empty() && !s.x509_svid_key.is_empty()
                                        })
                                    })
                                }),
                                Err(_) => false,
                            }
                        }
                    };
                    tally.record(&window, t0, ok);
                }
                tally
            })
        })
        .collect();
    Ok((window, workers))
}

async fn issuance_run(
    target: &Arc<Target>,
    transport: Transport,
    kind: Kind,
    clients: usize,
    seconds: f64,
    csrs: &Arc<Vec<Vec<u8>>>,
) -> anyhow::Result<Value> {
    let (window, workers, keepers) = if transport == Transport::Workload {
        let (window, workers) = workload_clients(target, kind, clients, seconds).await?;
        (window, workers, Vec::new())
    } else {
        broker_clients(target, transport, kind, clients, seconds, csrs).await?
    };
    tokio::time::sleep_until(window.start).await;
    let commits0 = commit_totals(target).await;
    let cpu0 = target.cpu.read();
    let sqlite0 = target.cpu.read_sqlite();
    let wall0 = Instant::now();
    let mut all = Vec::new();
    let mut errors = 0;
    for w in workers {
        let tally = w.await?;
        all.extend(tally.latencies);
        errors += tally.errors;
    }
    for k in keepers {
        k.abort();
    }
    let wall = wall0.elapsed().as_secs_f64().min(seconds).max(1e-9);
    let cpu = target.cpu.read().zip(cpu0).map(|(b, a)| b - a);
    let sqlite = target.cpu.read_sqlite().zip(sqlite0).map(|(b, a)| b - a);
    let leases_per_commit =
        commit_totals(target)
            .await
            .zip(commits0)
            .and_then(|((leases, commits), (l0, c0))| {
                (commits > c0).then(|| ((leases - l0) / (commits - c0) * 10.0).round() / 10.0)
            });
    let n = all.len();
    Ok(json!({
        "transport": transport.name(),
        "credential": kind.name(transport),
        "clients": clients,
        "credentials": n,
        "errors": errors,
        "per_second": (n as f64 / wall).round(),
        "latency": latency_json(all),
        "broker_cpu_us_per_credential": cpu.map(|c| (c / n.max(1) as f64 * 1e7).round() / 10.0),
        "sqlite_cpu_us_per_credential": sqlite.map(|c| (c / n.max(1) as f64 * 1e7).round() / 10.0),
        "leases_per_commit": leases_per_commit,
    }))
}

/// Leases committed and commits so far, from the broker's `/metrics` (in-process broker only).
async fn commit_totals(target: &Target) -> Option<(f64, f64)> {
    let (_, body) = http(target.http.as_deref()?, "GET", "/metrics", "")
        .await
        .ok()?;
    let text = String::from_utf8_lossy(&body);
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
    };
    Some((
        value("ephemera_store_commit_batch_leases_sum")?,
        value("ephemera_store_commit_batch_leases_count")?,
    ))
}

async fn issuance(target: &Arc<Target>, args: &Args, sign_rate: f64) -> anyhow::Result<Value> {
    // CSRs made before timing: 256 distinct P-256 keys, cycled.
    let csrs = Arc::new(
        (0..256)
            .map(|_| {
                let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
                Ok(rcgen::CertificateParams::default()
                    .serialize_request(&key)?
                    .der()
                    .to_vec())
            })
            .collect::<anyhow::Result<Vec<_>>>()?,
    );
    let mut transports = Vec::new();
    if target.tcp.is_some() && target.tcp_evidence.is_some() {
        transports.push(Transport::Tcp);
    }
    if !target.socket.as_os_str().is_empty() {
        transports.push(Transport::Unix);
    }
    if target.workload_socket.is_some() {
        transports.push(Transport::Workload);
    }
    let mut runs = Vec::new();
    for t in transports {
        // The Workload API mints with broker keys only. Its X.509 run goes last: every stream
        // it closes revokes a certificate, and the CRL carries them until they expire.
        let kinds: &[Kind] = match t {
            Transport::Workload => &[Kind::Jwt, Kind::X509Keygen],
            _ => &[Kind::X509Csr, Kind::X509Keygen, Kind::Jwt],
        };
        for &kind in kinds {
            if !args.wants_case(t, kind) {
                continue;
            }
            let mut r = issuance_run(target, t, kind, args.clients, args.seconds, &csrs).await?;
            if let Some(us) = r["broker_cpu_us_per_credential"].as_f64() {
                let sig_us = 1e6 / sign_rate;
                r["cpu_per_credential_in_signatures"] =
                    json!((us / sig_us * 100.0).round() / 100.0);
            }
            runs.push(r);
        }
    }
    Ok(Value::Array(runs))
}

// ---------------------------------------------------------------------------------------------
// 2. Revocation propagation

/// A bare HTTP/1.1 request on loopback; returns (status, body).
async fn http(base: &str, method: &str, path: &str, body: &str) -> anyhow::Result<(u16, Vec<u8>)> {
    let host = base.strip_prefix("http://").context("http:// base")?;
    let mut s = tokio::net::TcpStream::connect(host).await?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no header end")?;
    let status = std::str::from_utf8(&buf[..split])?
        .split(' ')
        .nth(1)
        .context("no status")?
        .parse()?;
    Ok((status, buf[split + 4..].to_vec()))
}

async fn introspect_inactive(http_base: &str, token: &str) -> anyhow::Result<bool> {
    let (_, body) = http(http_base, "POST", "/introspect", &format!("token={token}")).await?;
    Ok(!String::from_utf8_lossy(&body).contains("\"active\":true"))
}

/// Polls `/crl` until it lists every one of `serials` (hex; at most 30 s), and returns when
/// each was first listed. One poller serves all of them: each round fetches and parses the CRL
/// once, so many serials watched together do not load the machine with CRL downloads.
async fn crl_observed(http_base: &str, serials: &[String]) -> anyhow::Result<Vec<Instant>> {
    let wanted = serials
        .iter()
        .map(|s| ephemera::ca::crl::parse_hex(s).ok_or_else(|| anyhow!("serial {s:?} is not hex")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut seen: Vec<Option<Instant>> = vec![None; wanted.len()];
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.iter().any(Option::is_none) {
        if Instant::now() > deadline {
            bail!("not in the CRL within 30s");
        }
        let (_, der) = http(http_base, "GET", "/crl", "").await?;
        let fetched = Instant::now();
        let (_, crl) = x509_parser::parse_x509_crl(&der).map_err(|e| anyhow!("CRL: {e}"))?;
        let listed: std::collections::HashSet<&[u8]> = crl
            .iter_revoked_certificates()
            .map(|r| r.raw_serial())
            .collect();
        for (at, serial) in seen.iter_mut().zip(&wanted) {
            if at.is_none() && listed.contains(serial.as_slice()) {
                *at = Some(fetched);
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(seen.into_iter().flatten().collect())
}

/// Polls `check` every millisecond until it holds (at most 30s); returns when it first did.
async fn until<F, Fut>(mut check: F) -> anyhow::Result<Instant>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if check().await? {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            bail!("not observed within 30s");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[derive(Clone, Copy, Debug)]
enum Trigger {
    EndTask,
    KeepAliveLoss,
    AdminRevoke,
}

struct Minted {
    task_id: String,
    token: String,
    serial: String,
}

async fn mint_in_task(client: &mut BrokerClient<Channel>) -> anyhow::Result<Minted> {
    let task = client
        .begin_task(BeginTaskRequest::default())
        .await?
        .into_inner();
    let jwt = client
        .mint_jwt_svid(MintJwtSvidRequest {
            audience: vec!["bench".into()],
            task_id: task.task_id.clone(),
            ..MintJwtSvidRequest::default()
        })
        .await?
        .into_inner();
    let x = client
        .mint_x509_svid(MintX509SvidRequest {
            task_id: task.task_id.clone(),
            ..MintX509SvidRequest::default()
        })
        .await?
        .into_inner();
    Ok(Minted {
        task_id: task.task_id,
        token: jwt.token,
        serial: x.serial,
    })
}

async fn revocation(target: &Arc<Target>, count: usize) -> anyhow::Result<Value> {
    let http_base = target.http.clone().context("no HTTP address")?;
    let channel = target.channel(Transport::Unix).await?;
    let mut client = BrokerClient::new(channel.clone());
    let mut admin = AdminClient::new(channel.clone());
    // One watcher for the whole run records when each task's event arrived.
    let seen: Arc<std::sync::Mutex<HashMap<String, Instant>>> = Arc::default();
    let mut stream = RevocationsClient::new(channel.clone())
        .watch(WatchRequest { cursor: None })
        .await?
        .into_inner();
    let watcher = {
        let seen = seen.clone();
        tokio::spawn(async move {
            loop {
                match stream.message().await {
                    Ok(Some(ev)) => {
                        if let Ok(mut s) = seen.lock() {
                            s.entry(ev.task_id).or_insert_with(Instant::now);
                        }
                    }
                    Ok(None) => {
                        eprintln!("the watch stream ended");
                        break;
                    }
                    Err(e) => {
                        eprintln!("the watch stream failed: {e}");
                        break;
                    }
                }
            }
        })
    };
    let wait_watch = |task_id: String| {
        let seen = seen.clone();
        async move {
            until(|| {
                let hit = seen.lock().map(|s| s.get(&task_id).copied()).ok().flatten();
                async move { Ok(hit.is_some()) }
            })
            .await
            .context("the watch event")?;
            let at = seen.lock().ok().and_then(|s| s.get(&task_id).copied());
            at.context("watch event")
        }
    };

    let mut out = serde_json::Map::new();
    for trigger in [
        Trigger::EndTask,
        Trigger::AdminRevoke,
        Trigger::KeepAliveLoss,
    ] {
        let (mut to_watch, mut to_introspect, mut to_crl) = (Vec::new(), Vec::new(), Vec::new());
        // Keep-alive loss takes a grace period each, so those tasks run together.
        let batch = if matches!(trigger, Trigger::KeepAliveLoss) {
            count
        } else {
            1
        };
        let mut left = count;
        while left > 0 {
            let n = batch.min(left);
            left -= n;
            let mut minted = Vec::new();
            let mut streams = Vec::new();
            for _ in 0..n {
                let m = mint_in_task(&mut client).await?;
                if matches!(trigger, Trigger::KeepAliveLoss) {
                    let (tx, rx) = tokio::sync::mpsc::channel(2);
                    tx.send(KeepAliveRequest {
                        task_id: m.task_id.clone(),
                    })
                    .await?;
                    let resp = client
                        .keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
                        .await?;
                    streams.push((tx, resp));
                }
                minted.push(m);
            }
            let t0 = Instant::now();
            match trigger {
                Trigger::EndTask => {
                    for m in &minted {
                        client
                            .end_task(EndTaskRequest {
                                task_id: m.task_id.clone(),
                            })
                            .await?;
                    }
                }
                Trigger::AdminRevoke => {
                    for m in &minted {
                        admin
                            .revoke_task(target.admin(RevokeTaskRequest {
                                task_id: m.task_id.clone(),
                            })?)
                            .await?;
                    }
                }
                Trigger::KeepAliveLoss => drop(streams),
            }
            let observed = minted.iter().map(|m| {
                let http_base = http_base.clone();
                let watch = wait_watch(m.task_id.clone());
                let token = m.token.clone();
                async move {
                    let w = watch.await?;
                    let i = until(|| introspect_inactive(&http_base, &token))
                        .await
                        .context("introspection inactive")?;
                    anyhow::Ok((w, i))
                }
            });
            let serials: Vec<String> = minted.iter().map(|m| m.serial.clone()).collect();
            let (observed, in_crl) = tokio::join!(
                futures_join_all(observed),
                crl_observed(&http_base, &serials)
            );
            for r in observed {
                let (w, i) = r?;
                to_watch.push(w.saturating_duration_since(t0));
                to_introspect.push(i.saturating_duration_since(t0));
            }
            to_crl.extend(in_crl?.into_iter().map(|c| c.saturating_duration_since(t0)));
        }
        let key = match trigger {
            Trigger::EndTask => "end_task",
            Trigger::AdminRevoke => "admin_revoke",
            Trigger::KeepAliveLoss => "keep_alive_loss",
        };
        out.insert(
            key.into(),
            json!({
                "tasks": count,
                "to_watch_event": latency_json(to_watch),
                "to_introspection_inactive": latency_json(to_introspect),
                "to_crl": latency_json(to_crl),
            }),
        );
    }
    watcher.abort();
    out.insert(
        "note".into(),
        json!("keep_alive_loss is timed from the stream's close; it includes the 1s grace and up to 1s until the reaper's next pass"),
    );
    Ok(Value::Object(out))
}

/// Runs futures concurrently and collects their results in order.
async fn futures_join_all<F>(futs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        if let Ok(v) = h.await {
            out.push(v);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// 3. Lease scale

fn dir_size(path: &Path) -> u64 {
    std::fs::read_dir(path)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("ephemera.db"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// A broker process (`ephemera serve`) on a prepared data directory.
struct Child {
    child: std::process::Child,
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ephemera_binary() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let bin = me.with_file_name("ephemera");
    if bin.exists() {
        Ok(bin)
    } else {
        bail!(
            "{} not found: build it (cargo build --release) next to ephemera-bench",
            bin.display()
        )
    }
}

async fn wait_ready(http_base: &str, child: &mut std::process::Child) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok((200, _)) = http(http_base, "GET", "/readyz", "").await {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("broker exited: {status}");
        }
        if Instant::now() > deadline {
            bail!("broker not ready within 120s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn fill(
    store: Arc<dyn Store>,
    tasks: usize,
    leases: usize,
    big: usize,
    big_tasks: usize,
) -> anyhow::Result<()> {
    let now = unix_now();
    // Tasks stay live through the run: long heartbeat and grace, deadline tomorrow.
    let mut inflight = tokio::task::JoinSet::new();
    for i in 0..tasks {
        let store = store.clone();
        inflight.spawn(async move {
            store
                .insert_task(Task {
                    id: format!("task-{i:08}"),
                    spiffe_id: format!("spiffe://dev.local/bench/w{}", i % 1000),
                    attestor: "unix".into(),
                    claims: serde_json::Map::new(),
                    labels: Default::default(),
                    source_ip: None,
                    evidence_age_secs: 0,
                    created_at: now,
                    deadline: now + 86_400,
                    heartbeat_secs: 3600,
                    grace_secs: 3600,
                    due_at: now + 7200,
                    state: TaskState::Active,
                    ended_at: None,
                    reason: None,
                })
                .await
        });
        while inflight.len() >= 256 {
            if let Some(r) = inflight.join_next().await {
                r??;
            }
        }
    }
    while let Some(r) = inflight.join_next().await {
        r??;
    }
    // Tasks 0..big_tasks hold `big` leases each; the rest spread evenly. Expiry spread over 100
    // minutes, so 1% of the leases expire each minute.
    let in_big = big * big_tasks;
    let spread = leases.saturating_sub(in_big).max(1);
    for i in 0..leases {
        let store = store.clone();
        let task = if i < in_big {
            i / big
        } else {
            big_tasks + (i - in_big) % tasks.saturating_sub(big_tasks).max(1)
        };
        // The big tasks' leases outlive the run: their revocation lists every one of them.
        let expires = if i < in_big {
            now + 86_400
        } else {
            now + 60 + i64::try_from(((i - in_big) as u64 * 6000) / spread as u64).unwrap_or(0)
        };
        inflight.spawn(async move {
            store
                .insert_lease(Lease {
                    id: format!("lease-{i:09}"),
                    task_id: Some(format!("task-{task:08}")),
                    kind: if i % 2 == 0 {
                        LeaseKind::Jwt
                    } else {
                        LeaseKind::X509
                    },
                    serial: (i % 2 == 1).then(|| format!("{i:032x}")),
                    spiffe_id: format!("spiffe://dev.local/bench/w{}", task % 1000),
                    audience: if i % 2 == 0 {
                        vec!["bench".into()]
                    } else {
                        vec![]
                    },
                    issued_at: now,
                    expires_at: expires,
                    revoked: false,
                    revoked_at: None,
                    reason: None,
                })
                .await
        });
        while inflight.len() >= 2048 {
            if let Some(r) = inflight.join_next().await {
                r??;
            }
        }
    }
    while let Some(r) = inflight.join_next().await {
        r??;
    }
    Ok(())
}

/// Tasks of 10,000 leases revoked in the lease-scale run, one after another.
const BIG_TASKS: usize = 3;

async fn lease_scale(args: &Args, store_url: Option<&str>) -> anyhow::Result<Value> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let mut opts = DevOptions::embedded(&data);
    opts.log_level = "error".into();
    opts.extra_config = store_config(store_url);
    let config = opts.prepare(dir.path())?;
    let big = 10_000.min(args.leases / 2);
    // Several such tasks, so the revocation is more than one sample (one in the smoke run).
    let big_tasks = BIG_TASKS.min(args.leases / (2 * big.max(1))).max(1);

    // Fill through the store itself (what a broker would have written over time).
    let fill_started = Instant::now();
    let db_bytes = match &config.store {
        ephemera::config::StoreConfig::Sqlite { path } => {
            let store = Arc::new(ephemera::store::sqlite::SqliteStore::open(path).await?);
            fill(store, args.tasks, args.leases, big, big_tasks).await?;
            dir_size(&data)
        }
        ephemera::config::StoreConfig::Postgres(pg) => {
            let store = Arc::new(ephemera::store::postgres::PostgresStore::open(pg).await?);
            fill(store.clone(), args.tasks, args.leases, big, big_tasks).await?;
            let bytes: i64 = sqlx::query_scalar("SELECT pg_database_size(current_database())")
                .fetch_one(store.pool())
                .await?;
            u64::try_from(bytes).unwrap_or(0)
        }
    };
    let fill_secs = fill_started.elapsed().as_secs_f64();

    // Restart to ready: a broker process on the filled store.
    let started = Instant::now();
    let (child, endpoints) = serve(&opts, dir.path(), &data).await?;
    let restart = started.elapsed();
    let pid = child.child.id();
    let (rss_ready, _) = rss_mib(pid);

    let channel = ConnectOptions {
        socket: Some(endpoints.broker_socket.clone()),
        ..ConnectOptions::default()
    }
    .connect()
    .await?;
    let target = Target {
        socket: endpoints.broker_socket.clone(),
        workload_socket: None,
        tcp: None,
        http: Some(endpoints.http_addr.clone()),
        tcp_evidence: None,
        admin_token: std::fs::read_to_string(&config.admin_token_file)
            .ok()
            .map(|t| t.trim().to_owned()),
        cpu: BrokerCpu {
            pid: Some(pid),
            prefixes: vec![],
        },
        _runtime: None,
        _running: None,
        _dir: None,
    };
    let mut admin = AdminClient::new(channel.clone());

    // ListLeases pages of 100: the first page and pages deep into the listing.
    let mut pages = Vec::new();
    let mut token = String::new();
    for _ in 0..50 {
        let t0 = Instant::now();
        let page = admin
            .list_leases(target.admin(ListLeasesRequest {
                page_size: 100,
                page_token: token.clone(),
                ..ListLeasesRequest::default()
            })?)
            .await?
            .into_inner();
        pages.push(t0.elapsed());
        token = page.next_page_token;
    }
    let mut active_pages = Vec::new();
    for _ in 0..20 {
        let t0 = Instant::now();
        admin
            .list_leases(target.admin(ListLeasesRequest {
                page_size: 100,
                state: "active".into(),
                ..ListLeasesRequest::default()
            })?)
            .await?;
        active_pages.push(t0.elapsed());
    }
    // One task's leases (an operator looking at one task): about ten, spread over the table.
    let mut task_pages = Vec::new();
    for i in 0..20 {
        let task_id = format!("task-{:08}", args.tasks.saturating_sub(1 + i));
        let t0 = Instant::now();
        let page = admin
            .list_leases(target.admin(ListLeasesRequest {
                page_size: 100,
                task_id,
                ..ListLeasesRequest::default()
            })?)
            .await?
            .into_inner();
        task_pages.push(t0.elapsed());
        if page.leases.is_empty() {
            bail!("a task of the lease-scale store listed no leases");
        }
    }

    // Revoking each task with `big` leases: the admin call, then its watch event with every
    // credential.
    let mut watch = RevocationsClient::new(channel.clone())
        .watch(WatchRequest { cursor: None })
        .await?
        .into_inner();
    let (mut revoke_calls, mut revoke_events, mut in_event) = (Vec::new(), Vec::new(), usize::MAX);
    for task in 0..big_tasks {
        let t0 = Instant::now();
        admin
            .revoke_task(target.admin(RevokeTaskRequest {
                task_id: format!("task-{task:08}"),
            })?)
            .await?;
        revoke_calls.push(t0.elapsed());
        let event = tokio::time::timeout(Duration::from_secs(60), watch.message())
            .await
            .context("no watch event")??
            .context("watch ended")?;
        revoke_events.push(t0.elapsed());
        in_event = in_event.min(event.credentials.len());
    }

    // Reaper and idle CPU while leases expire at 1% a minute.
    let cpu0 = target.cpu.read().unwrap_or(0.0);
    tokio::time::sleep(Duration::from_secs_f64(args.reaper_seconds)).await;
    let cpu = target.cpu.read().unwrap_or(0.0) - cpu0;
    let (rss_now, rss_peak) = rss_mib(pid);

    Ok(json!({
        "store": if store_url.is_some() { "postgresql" } else { "sqlite" },
        "leases": args.leases,
        "tasks": args.tasks,
        "fill_seconds": (fill_secs * 10.0).round() / 10.0,
        "database_mib": (db_bytes as f64 / 1048576.0 * 10.0).round() / 10.0,
        "restart_to_ready_ms": ms(restart),
        "rss_mib_ready": (rss_ready * 10.0).round() / 10.0,
        "rss_mib_end": (rss_now * 10.0).round() / 10.0,
        "rss_mib_peak": (rss_peak * 10.0).round() / 10.0,
        "list_leases_page": latency_json(pages),
        "list_active_leases_first_page": latency_json(active_pages),
        "list_one_task_leases": latency_json(task_pages),
        "revoke_task": {
            "leases": big,
            "admin_call": latency_json(revoke_calls),
            "watch_event": latency_json(revoke_events),
            "credentials_in_event": in_event,
        },
        "idle_cpu": {
            "seconds_sampled": args.reaper_seconds,
            "cpu_ms_per_minute": ((cpu / args.reaper_seconds * 60.0) * 1000.0).round(),
        },
    }))
}

// ---------------------------------------------------------------------------------------------
// 4. Soak

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// Starts `ephemera serve` on `opts` (already prepared in `data`) and waits until it is ready.
async fn serve(
    opts: &DevOptions,
    dir: &Path,
    data: &Path,
) -> anyhow::Result<(Child, ephemera::endpoints::Endpoints)> {
    let config_path = dir.join("ephemera.toml");
    std::fs::write(
        &config_path,
        opts.config_text(ephemera::dev::current_uid()?),
    )?;
    let mut child = Child {
        child: std::process::Command::new(ephemera_binary()?)
            .args(["serve", "--config"])
            .arg(&config_path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?,
    };
    let endpoints = loop {
        if let Ok(e) = ephemera::endpoints::Endpoints::read(data) {
            break e;
        }
        if let Some(status) = child.child.try_wait()? {
            bail!("broker exited: {status}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    wait_ready(&endpoints.http_addr, &mut child.child).await?;
    Ok((child, endpoints))
}

/// A broker process on a fresh data directory, with its socket client and admin token.
async fn broker_process(
    store_url: Option<&str>,
) -> anyhow::Result<(
    Child,
    ephemera::endpoints::Endpoints,
    String,
    tempfile::TempDir,
)> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let mut opts = DevOptions::embedded(&data);
    opts.log_level = "error".into();
    opts.extra_config = format!(
        "[tasks]\nheartbeat_interval = \"1s\"\ngrace = \"2s\"\n[limits]\nrequests_per_second = 0\nmax_active_tasks_per_identity = 0\n{}",
        store_config(store_url)
    );
    let config = opts.prepare(dir.path())?;
    let (child, endpoints) = serve(&opts, dir.path(), &data).await?;
    let token = std::fs::read_to_string(&config.admin_token_file)?
        .trim()
        .to_owned();
    Ok((child, endpoints, token, dir))
}

/// Lifetime of the soak's credentials. Revoked certificates stay in the CRL until they expire,
/// so the CRL (and the memory it takes) reaches its steady size after one lifetime; a short one
/// lets a ten-minute soak show the steady state a broker reaches after its longest TTL.
const SOAK_TTL_SECS: u64 = 120;

async fn soak(seconds: f64, store_url: Option<&str>) -> anyhow::Result<Value> {
    let (child, endpoints, admin_token, _dir) = broker_process(store_url).await?;
    let pid = child.child.id();
    let connect = ConnectOptions {
        socket: Some(endpoints.broker_socket.clone()),
        ..ConnectOptions::default()
    };
    let channel = || connect.connect();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut workers = Vec::new();
    // Task lifecycles: begin, keep alive, mint both kinds, end.
    for _ in 0..16 {
        let mut c = BrokerClient::new(channel().await?);
        let (stop, done, errors) = (stop.clone(), done.clone(), errors.clone());
        workers.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r: anyhow::Result<()> = async {
                    let task = c
                        .begin_task(BeginTaskRequest::default())
                        .await?
                        .into_inner();
                    let (tx, rx) = tokio::sync::mpsc::channel(2);
                    tx.send(KeepAliveRequest {
                        task_id: task.task_id.clone(),
                    })
                    .await?;
                    let mut ka = c
                        .keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
                        .await?
                        .into_inner();
                    ka.message().await?;
                    for _ in 0..3 {
                        c.mint_jwt_svid(MintJwtSvidRequest {
                            audience: vec!["soak".into()],
                            task_id: task.task_id.clone(),
                            ttl_seconds: Some(SOAK_TTL_SECS),
                            ..MintJwtSvidRequest::default()
                        })
                        .await?;
                        c.mint_x509_svid(MintX509SvidRequest {
                            task_id: task.task_id.clone(),
                            ttl_seconds: Some(SOAK_TTL_SECS),
                            ..MintX509SvidRequest::default()
                        })
                        .await?;
                        tx.send(KeepAliveRequest::default()).await?;
                    }
                    c.end_task(EndTaskRequest {
                        task_id: task.task_id,
                    })
                    .await?;
                    Ok(())
                }
                .await;
                match r {
                    Ok(()) => done.fetch_add(6, std::sync::atomic::Ordering::Relaxed),
                    Err(_) => errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                };
            }
        }));
    }
    // Watchers that stay, and watchers that come and go.
    for i in 0..4 {
        let mut r = RevocationsClient::new(channel().await?);
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok(s) = r.watch(WatchRequest { cursor: None }).await else {
                    continue;
                };
                let mut s = s.into_inner();
                let until = Instant::now() + Duration::from_secs(if i == 0 { 3600 } else { 5 });
                while Instant::now() < until && !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if tokio::time::timeout(Duration::from_secs(1), s.message())
                        .await
                        .is_ok_and(|m| m.is_err())
                    {
                        break;
                    }
                }
            }
        }));
    }
    // An admin listing every second.
    {
        let mut admin = AdminClient::new(channel().await?);
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut req = tonic::Request::new(ListLeasesRequest {
                    page_size: 100,
                    ..ListLeasesRequest::default()
                });
                if let Ok(v) = format!("Bearer {admin_token}").parse() {
                    req.metadata_mut().insert("authorization", v);
                }
                let _ = admin.list_leases(req).await;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }));
    }
    let started = Instant::now();
    let every = (seconds / 20.0).max(0.5);
    let mut samples = Vec::new();
    while started.elapsed().as_secs_f64() < seconds {
        tokio::time::sleep(Duration::from_secs_f64(every)).await;
        let (rss, _) = rss_mib(pid);
        samples.push(json!({
            "t_s": (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
            "rss_mib": (rss * 10.0).round() / 10.0,
            "open_fds": open_fds(pid),
            "credentials": done.load(std::sync::atomic::Ordering::Relaxed),
        }));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in workers {
        w.abort();
    }
    let first = samples
        .get(samples.len().min(2).saturating_sub(1))
        .cloned()
        .unwrap_or_default();
    let last = samples.last().cloned().unwrap_or_default();
    Ok(json!({
        "seconds": seconds,
        "credential_ttl_s": SOAK_TTL_SECS,
        "samples": samples,
        "errors": errors.load(std::sync::atomic::Ordering::Relaxed),
        "rss_growth_mib": ((last["rss_mib"].as_f64().unwrap_or(0.0) - first["rss_mib"].as_f64().unwrap_or(0.0)) * 10.0).round() / 10.0,
        "fd_growth": last["open_fds"].as_i64().unwrap_or(0) - first["open_fds"].as_i64().unwrap_or(0),
    }))
}

// ---------------------------------------------------------------------------------------------
// Reporting

fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| (kb / 1048576.0 * 10.0).round() / 10.0);
    json!({
        "cpu": model,
        "cores": cores,
        "memory_gib": mem,
        "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
    })
}

/// A JSON value as a table cell: strings bare, numbers as written, absent as "-".
fn cell(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn print_table(report: &Value) {
    let m = &report["machine"];
    println!(
        "ephemera-bench on {} ({} cores, {} GiB), {} build\n",
        cell(&m["cpu"]),
        m["cores"],
        m["memory_gib"],
        cell(&m["profile"])
    );
    if report["signing"].is_object() {
        println!(
            "single-core ES256 signing (ring): {} signatures/s\n",
            report["signing"]["es256_per_second"]
        );
    }
    if let Some(runs) = report["issuance"].as_array() {
        println!(
            "{:<8} {:<24} {:>9} {:>8} {:>8} {:>8} {:>8} {:>10} {:>6} {:>9} {:>8}",
            "issue",
            "credential",
            "per sec",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms",
            "cpu us/cr",
            "x sig",
            "sqlite us",
            "l/commit"
        );
        for r in runs {
            println!(
                "{:<8} {:<24} {:>9} {:>8} {:>8} {:>8} {:>8} {:>10} {:>6} {:>9} {:>8}",
                cell(&r["transport"]),
                cell(&r["credential"]),
                cell(&r["per_second"]),
                cell(&r["latency"]["p50_ms"]),
                cell(&r["latency"]["p90_ms"]),
                cell(&r["latency"]["p99_ms"]),
                cell(&r["latency"]["max_ms"]),
                cell(&r["broker_cpu_us_per_credential"]),
                cell(&r["cpu_per_credential_in_signatures"]),
                cell(&r["sqlite_cpu_us_per_credential"]),
                cell(&r["leases_per_commit"]),
            );
        }
        println!();
    }
    if let Some(rev) = report["revocation"].as_object() {
        println!(
            "{:<16} {:>6} {:>14} {:>14} {:>14} {:>14} {:>12} {:>12}",
            "revocation",
            "tasks",
            "watch p50 ms",
            "watch p99 ms",
            "intro p50 ms",
            "intro p99 ms",
            "crl p50 ms",
            "crl p99 ms"
        );
        for key in ["end_task", "admin_revoke", "keep_alive_loss"] {
            let r = &rev[key];
            println!(
                "{:<16} {:>6} {:>14} {:>14} {:>14} {:>14} {:>12} {:>12}",
                key,
                cell(&r["tasks"]),
                cell(&r["to_watch_event"]["p50_ms"]),
                cell(&r["to_watch_event"]["p99_ms"]),
                cell(&r["to_introspection_inactive"]["p50_ms"]),
                cell(&r["to_introspection_inactive"]["p99_ms"]),
                cell(&r["to_crl"]["p50_ms"]),
                cell(&r["to_crl"]["p99_ms"]),
            );
        }
        println!("({})\n", rev["note"].as_str().unwrap_or(""));
    }
    if let Some(samples) = report["soak"]["samples"].as_array() {
        println!(
            "soak: {}s of mixed load, credentials of {}s",
            report["soak"]["seconds"], report["soak"]["credential_ttl_s"]
        );
        println!(
            "{:>8} {:>10} {:>9} {:>12}",
            "t (s)", "RSS (MiB)", "open fds", "credentials"
        );
        for x in samples {
            println!(
                "{:>8} {:>10} {:>9} {:>12}",
                cell(&x["t_s"]),
                cell(&x["rss_mib"]),
                cell(&x["open_fds"]),
                cell(&x["credentials"])
            );
        }
        println!(
            "RSS growth after the first sample: {} MiB; open fds: {:+}; request errors: {}\n",
            report["soak"]["rss_growth_mib"],
            report["soak"]["fd_growth"].as_i64().unwrap_or(0),
            report["soak"]["errors"]
        );
    }
    if report["lease_scale"].is_object() {
        let l = &report["lease_scale"];
        println!(
            "lease scale ({}): {} leases in {} tasks (filled in {}s)",
            cell(&l["store"]),
            l["leases"],
            l["tasks"],
            l["fill_seconds"]
        );
        println!("  database size            {} MiB", l["database_mib"]);
        println!("  restart to ready         {} ms", l["restart_to_ready_ms"]);
        println!(
            "  broker RSS               {} MiB ready, {} MiB at end, {} MiB peak",
            l["rss_mib_ready"], l["rss_mib_end"], l["rss_mib_peak"]
        );
        println!(
            "  ListLeases page (100)    p50 {} ms, p99 {} ms; active-only first page p50 {} ms; \
             one task's leases p50 {} ms, p99 {} ms",
            l["list_leases_page"]["p50_ms"],
            l["list_leases_page"]["p99_ms"],
            l["list_active_leases_first_page"]["p50_ms"],
            l["list_one_task_leases"]["p50_ms"],
            l["list_one_task_leases"]["p99_ms"]
        );
        let r = &l["revoke_task"];
        println!(
            "  revoke task ({} leases)  {} tasks: admin call p50 {} ms, max {} ms; watch event \
             with {} credentials p50 {} ms, max {} ms",
            r["leases"],
            r["watch_event"]["samples"],
            r["admin_call"]["p50_ms"],
            r["admin_call"]["max_ms"],
            r["credentials_in_event"],
            r["watch_event"]["p50_ms"],
            r["watch_event"]["max_ms"]
        );
        println!(
            "  CPU while 1%/min expire  {} ms per minute (sampled {}s)",
            l["idle_cpu"]["cpu_ms_per_minute"], l["idle_cpu"]["seconds_sampled"]
        );
    }
}

/// Logging for the in-process broker, as `log.level = "info"` with `log.format = "json"`
/// configures a deployed one (each line is written when its event happens), into `path` or an
/// unnamed temporary file.
fn broker_log(path: Option<&Path>) -> anyhow::Result<()> {
    let file = match path {
        Some(p) => std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        None => tempfile::tempfile()?,
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .json()
        .with_writer(std::sync::Mutex::new(file))
        .try_init()
        .map_err(|e| anyhow!("{e}"))
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
