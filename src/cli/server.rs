//! Server-side commands: `serve`, `dev`, `ca init`, `config check`.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context;
use clap::Args;

use super::{EXIT_USAGE, Failure};
use crate::app::{self, StartError};
use crate::ca::keys::{self, InitOptions};
use crate::clock::SystemClock;
use crate::config::{Config, LogFormat};
use crate::dev::DevOptions;
use crate::id::TrustDomain;

/// `ephemera dev` arguments.
#[derive(Debug, Args)]
pub struct DevArgs {
    /// Data directory for keys, sockets and endpoints.json (created 0700).
    #[arg(long, env = "EPHEMERA_DATA_DIR", default_value = ".ephemera")]
    pub data_dir: PathBuf,
    /// Trust domain of the dev CA (fixed when the data directory is first created).
    #[arg(long, default_value = "dev.local")]
    pub trust_domain: String,
    /// gRPC TCP address (TLS); use 127.0.0.1:0 for any free port.
    #[arg(long, default_value = "127.0.0.1:7443")]
    pub grpc_addr: String,
    /// HTTP address (bundle, keys, discovery, health).
    #[arg(long, default_value = "127.0.0.1:7080")]
    pub http_addr: String,
    /// A TOML file layered onto the dev defaults: attestors (`[[oidc]]`, `[x509pop]`), extra
    /// `[[mapping]]` rules, `[policy] dir`, `[limits]`, `[tasks]` (read at start).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
}

/// `ephemera ca init` arguments.
#[derive(Debug, Args)]
pub struct CaInitArgs {
    /// Data directory to create the CA in (created 0700).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Trust domain the CA issues for, e.g. example.org.
    #[arg(long)]
    pub trust_domain: String,
    /// Root CA lifetime.
    #[arg(long, default_value = "87600h")]
    pub root_ttl: String,
    /// Intermediate CA lifetime (capped at the root's).
    #[arg(long, default_value = "8760h")]
    pub intermediate_ttl: String,
}

/// Sets up logging to stderr; `EPHEMERA_LOG` overrides the configured filter. Text lines are
/// coloured only on a terminal (and never with `NO_COLOR` set): a file, a pipe or journald gets
/// plain text, not escape codes.
fn init_logging(level: &str, format: LogFormat) {
    let filter = std::env::var("EPHEMERA_LOG")
        .ok()
        .and_then(|l| tracing_subscriber::EnvFilter::try_new(l).ok())
        .or_else(|| tracing_subscriber::EnvFilter::try_new(level).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour(
            std::io::stderr().is_terminal(),
            std::env::var_os("NO_COLOR").as_deref(),
        ))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Whether log lines get colour: only on a terminal, and not when `NO_COLOR` is set to
/// anything but the empty string (<https://no-color.org>).
fn colour(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(std::ffi::OsStr::is_empty)
}

fn start_failure(e: StartError) -> Failure {
    let code = if e.is_config() { EXIT_USAGE } else { 1 };
    Failure::new(code, e)
}

/// Why `ephemera dev` cannot listen on `addr`: another dev broker of this data directory (its
/// socket answers), or some other process.
fn port_taken(what: &str, addr: &str, data_dir: &Path) -> String {
    let alive = crate::endpoints::Endpoints::read(data_dir)
        .ok()
        .filter(|e| std::os::unix::net::UnixStream::connect(&e.broker_socket).is_ok());
    match alive {
        Some(e) => format!(
            "another `ephemera dev` broker is already running with data directory {} and \
             listens on {addr} ({what}); use it (gRPC {}, HTTP {}), stop it, or start a second one \
             with --data-dir OTHER --grpc-addr 127.0.0.1:0 --http-addr 127.0.0.1:0",
            data_dir.display(),
            e.grpc_addr,
            e.http_addr
        ),
        None => format!(
            "{addr} ({what}) is in use by another process (perhaps an `ephemera dev` started in \
             another directory); stop it, or pick other ports with --grpc-addr and --http-addr \
             (127.0.0.1:0 takes free ones)"
        ),
    }
}

/// Waits for Ctrl-C or SIGTERM.
async fn shutdown_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
        _ = term.recv() => {}
    }
    Ok(())
}

async fn run_until_signal(
    running: app::Running,
    config_path: Option<PathBuf>,
) -> Result<(), Failure> {
    let broker = running.broker.clone();
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing SIGHUP handler")?;
    let reloads = tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading policies and identity mapping");
            let b = broker.clone();
            let path = config_path.clone();
            let _ = tokio::task::spawn_blocking(move || {
                let _ = b.policy().reload();
                if let Some(p) = path {
                    let _ = app::reload_mappings(&b, &p);
                }
            })
            .await;
        }
    });
    shutdown_signal().await?;
    reloads.abort();
    tracing::info!("shutting down");
    running
        .shutdown()
        .await
        .map_err(|e| Failure::new(1, anyhow::anyhow!(e)))
}

/// `ephemera serve --config FILE`.
pub async fn serve(path: &Path) -> Result<(), Failure> {
    let config = Config::load(path).map_err(|e| Failure::new(EXIT_USAGE, e))?;
    init_logging(&config.log.level, config.log.format);
    let root_key = crate::datadir::DataDir::new(&config.data_dir).root_key();
    if root_key.exists() && !config.ca.root_online {
        tracing::warn!(
            file = %root_key.display(),
            "the root CA key is in the data directory but [ca] root_key = \"offline\": the broker does not need it; move it offline (anyone who reads it can make a trust anchor's worth of intermediates)"
        );
    }
    let running = app::start(config, Arc::new(SystemClock))
        .await
        .map_err(start_failure)?;
    run_until_signal(running, Some(path.to_owned())).await
}

/// `ephemera config check --config FILE`.
pub async fn config_check(path: &Path, connect: bool, json: bool) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    let report = |out: &mut dyn Write, ok: bool, config: Option<&Config>, problems: &[String]| {
        if json {
            let doc = serde_json::json!({
                "config": path.display().to_string(),
                "ok": ok,
                "trust_domain": config.map(|c| c.trust_domain.to_string()),
                "mapping_rules": config.map(|c| c.mappings.len()),
                "store_checked": connect,
                "problems": problems,
            });
            writeln!(out, "{doc}").context("writing to stdout")
        } else {
            Ok(())
        }
    };
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            report(&mut out, false, None, &[e.to_string()])?;
            return Err(Failure::new(EXIT_USAGE, e));
        }
    };
    let problems = startup_problems(&config, connect).await;
    report(&mut out, problems.is_empty(), Some(&config), &problems)?;
    if !problems.is_empty() {
        return Err(Failure::new(
            EXIT_USAGE,
            anyhow::anyhow!(
                "{}: {} problem(s) `serve` would refuse to start with:\n{}",
                path.display(),
                problems.len(),
                problems
                    .iter()
                    .map(|p| format!("  {p}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            ),
        ));
    }
    if !json {
        writeln!(
            out,
            "{}: ok (trust domain {}, {} mapping rule(s){})",
            path.display(),
            config.trust_domain,
            config.mappings.len(),
            if connect { ", store reachable" } else { "" }
        )
        .context("writing to stdout")?;
    }
    Ok(())
}

/// What `serve` checks before it binds, beyond the config file itself: the CA files (present,
/// mode 0600, of this trust domain), the x509pop bundles, the policy directory, the admin token
/// file's mode, the sockets' directories and, with `connect`, the store. Every problem, not the
/// first.
async fn startup_problems(config: &Config, connect: bool) -> Vec<String> {
    let mut problems = Vec::new();
    if let Err(e) = crate::ca::keys::load(&config.data_dir, &config.trust_domain) {
        problems.push(format!("CA in {}: {e}", config.data_dir.display()));
    } else if config.ca.root_online
        && let Err(e) =
            crate::ca::lifecycle::load_root(&crate::datadir::DataDir::new(&config.data_dir))
    {
        problems.push(format!("ca.root_key: {e}"));
    }
    if !config.x509pop_ca_bundles.is_empty()
        && let Err(e) = crate::attest::x509pop::ClientCas::load(&config.x509pop_ca_bundles)
    {
        problems.push(format!("x509pop.ca_bundles: {e}"));
    }
    match crate::policy::PolicyEngine::load(&config.policy_dir) {
        _ if !config.policy_dir.is_dir() => problems.push(format!(
            "policy: {} does not exist (create it with your *.cedar policies)",
            config.policy_dir.display()
        )),
        Err(list) => {
            for p in list {
                problems.push(format!("policy: {p}"));
            }
        }
        Ok(engine) if engine.count() == 0 => problems.push(format!(
            "policy: {} holds no policy: every request would be denied",
            config.policy_dir.display()
        )),
        Ok(_) => {}
    }
    if config.admin_token_file.exists()
        && let Err(e) = keys::check_key_mode(&config.admin_token_file)
    {
        problems.push(format!("admin token: {e}"));
    }
    let sockets = [Some(&config.grpc.socket), config.workload_socket.as_ref()];
    for socket in sockets.into_iter().flatten() {
        if let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty())
            && !dir.is_dir()
            && dir != config.data_dir
        {
            problems.push(format!(
                "socket {}: directory {} does not exist",
                socket.display(),
                dir.display()
            ));
        }
    }
    if connect {
        match &config.store {
            crate::config::StoreConfig::Postgres(pg) => {
                if let Err(e) = crate::store::postgres::PostgresStore::open(pg).await {
                    problems.push(format!("store: {e}"));
                }
            }
            crate::config::StoreConfig::Sqlite { path } => {
                if let Some(dir) = path.parent()
                    && dir.exists()
                    && std::fs::metadata(dir).is_ok_and(|m| m.permissions().readonly())
                {
                    problems.push(format!("store: {} is read-only", dir.display()));
                }
            }
        }
    }
    problems
}

/// `ephemera ca status`.
pub fn ca_status(data_dir: &Path, json: bool) -> Result<(), Failure> {
    let keys = keys::status(data_dir).map_err(|e| Failure::new(EXIT_USAGE, e))?;
    let now = crate::clock::unix_secs(SystemTime::now());
    let mut out = std::io::stdout().lock();
    let time = |t: Option<i64>| t.map(super::rfc3339);
    for k in &keys {
        let state = match k.not_after {
            Some(end) if end <= now => "expired",
            _ => "active",
        };
        if json {
            let doc = serde_json::json!({
                "kind": k.kind,
                "id": k.id,
                "state": state,
                "not_before": time(k.not_before),
                "not_after": time(k.not_after),
                "days_left": k.not_after.map(|end| (end - now).max(0) / 86_400),
                "key_in_data_dir": k.key_present,
            });
            writeln!(out, "{doc}")
        } else {
            writeln!(
                out,
                "{:<18} {:<8} {:<45} {} (key {})",
                k.kind,
                state,
                k.id,
                match (time(k.not_before), time(k.not_after)) {
                    (Some(a), Some(b)) => format!(
                        "{a} to {b}, {} days left",
                        k.not_after.map_or(0, |end| (end - now).max(0) / 86_400)
                    ),
                    _ => "no expiry".to_owned(),
                },
                match (k.kind, k.key_present) {
                    ("x509-root", true) => "in the data directory: move it offline",
                    ("x509-root", false) => "offline",
                    (_, true) => "present",
                    (_, false) => "missing",
                }
            )
        }
        .context("writing to stdout")?;
    }
    Ok(())
}

/// `ephemera ca init`.
pub fn ca_init(args: &CaInitArgs) -> Result<(), Failure> {
    let usage = |e: String| Failure::new(EXIT_USAGE, anyhow::anyhow!(e));
    let td: TrustDomain = args
        .trust_domain
        .parse()
        .map_err(|e| usage(format!("--trust-domain: {e}")))?;
    let root_ttl = crate::config::parse_duration(&args.root_ttl)
        .map_err(|e| usage(format!("--root-ttl: {e}")))?;
    let intermediate_ttl = crate::config::parse_duration(&args.intermediate_ttl)
        .map_err(|e| usage(format!("--intermediate-ttl: {e}")))?;
    keys::init(
        &args.data_dir,
        &td,
        InitOptions {
            root_ttl,
            intermediate_ttl,
        },
        SystemTime::now(),
    )
    .map_err(|e| Failure::new(EXIT_USAGE, e))?;
    let dir = crate::datadir::DataDir::new(&args.data_dir);
    crate::api::admin::create_token_file(&dir.admin_token()).map_err(|e| Failure::new(1, e))?;
    crate::api::admin::load_or_create_secret(&dir.admin_pages_key())
        .map_err(|e| Failure::new(1, e))?;
    let d = args.data_dir.display();
    writeln!(
        std::io::stdout().lock(),
        "created CA for trust domain {td} in {d}:\n  \
         {d}/{root} (trust anchor; also copied to {d}/{bundle})\n  \
         {d}/{root_key} (0600; the broker does not need it: keep it offline)\n  \
         {d}/{inter} and {d}/{inter_key} (0600)\n  \
         {d}/{jwt} (0600)\n  \
         {d}/{admin} (0600; the Admin API credential)\n  \
         {d}/{pages} (0600; keys Admin API page tokens: replicas share it with the CA files)",
        admin = crate::datadir::ADMIN_TOKEN,
        pages = crate::datadir::ADMIN_PAGES_KEY,
        root = keys::ROOT_CERT,
        bundle = keys::BUNDLE,
        root_key = keys::ROOT_KEY,
        inter = keys::INTERMEDIATE_CERT,
        inter_key = keys::INTERMEDIATE_KEY,
        jwt = keys::JWT_KEY,
    )
    .context("writing to stdout")?;
    Ok(())
}

/// `ephemera dev`.
pub async fn dev(args: DevArgs) -> Result<(), Failure> {
    let uid = crate::dev::current_uid()?;
    let cwd = std::env::current_dir().context("reading the current directory")?;
    init_logging("info", LogFormat::Text);
    let extra_config = match &args.config {
        None => String::new(),
        Some(path) => crate::dev::layer(path).map_err(|e| Failure::new(EXIT_USAGE, e))?,
    };
    let opts = DevOptions {
        data_dir: args.data_dir,
        trust_domain: args.trust_domain,
        grpc_addr: args.grpc_addr,
        http_addr: args.http_addr,
        log_level: "info".into(),
        extra_config,
        ..DevOptions::embedded("")
    };
    let config = opts.prepare(&cwd).map_err(|e| {
        let code = if e.is::<crate::config::ConfigError>() {
            EXIT_USAGE
        } else {
            1
        };
        Failure::new(code, e)
    })?;
    let data_dir = config.data_dir.clone();
    let td = config.trust_domain.clone();
    let running = match app::start(config, Arc::new(SystemClock)).await {
        Ok(r) => r,
        Err(StartError::Bind { what, addr, source })
            if source.kind() == std::io::ErrorKind::AddrInUse =>
        {
            return Err(Failure::new(
                super::EXIT_UNAVAILABLE,
                anyhow::anyhow!(port_taken(what, &addr, &data_dir)),
            ));
        }
        Err(e) => return Err(start_failure(e)),
    };
    let run = if std::env::var_os("CARGO").is_some() {
        "cargo run --release --"
    } else {
        "ephemera"
    };
    let e = &running.endpoints;
    let data_flag = if data_dir == cwd.join(".ephemera") {
        String::new()
    } else {
        format!(" --data-dir {}", data_dir.display())
    };
    let banner = format!(
        "\nEphemera dev broker for trust domain {td}\n  \
         gRPC (TLS)   {grpc}   trust anchors: {bundle}\n  \
         gRPC socket  {sock}\n  \
         SPIFFE Workload API  SPIFFE_ENDPOINT_SOCKET=unix://{workload}\n  \
         HTTP         {http}   (/bundle /keys /.well-known/openid-configuration /crl\n               \
         /introspect /metrics /livez /readyz)\n  \
         Your identity on the socket: spiffe://{td}/uid/{uid}\n\n\
         Try it from another terminal in this directory:\n  \
         {run} token --audience demo{data_flag}\n  \
         {run} svid --out svid{data_flag}\n  \
         openssl verify -CAfile svid/bundle.pem -untrusted svid/svid.pem svid/svid.pem\n\n\
         Ctrl-C stops the broker; keys stay in {dir} for next time.\n",
        grpc = e.grpc_addr,
        bundle = e.ca_bundle.display(),
        sock = e.broker_socket.display(),
        workload = e
            .workload_socket
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        http = e.http_addr,
        dir = data_dir.display(),
    );
    writeln!(std::io::stdout().lock(), "{banner}").context("writing to stdout")?;
    run_until_signal(running, None).await
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    use super::colour;

    #[test]
    fn log_lines_are_coloured_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(
            colour(true, Some(OsStr::new(""))),
            "an empty NO_COLOR is unset"
        );
        assert!(!colour(true, Some(OsStr::new("1"))));
        assert!(!colour(false, None), "a file or pipe gets no escape codes");
    }
}
