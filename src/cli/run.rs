//! `ephemera run -- CMD`: run a command inside a task, with credentials that die with it.
//!
//! Attest, `BeginTask`, keep the task alive, mint what was asked into a private directory, run
//! CMD, and end the task when CMD exits — however it exits — so every credential of the task is
//! revoked. The directory (mode 0700, named by `EPHEMERA_CREDENTIALS_DIR`) holds `svid.pem`,
//! `svid.key` and `bundle.pem` with `--x509`, and `jwt-<audience>.token` per `--jwt-audience`;
//! credentials are renewed in place at half their lifetime while CMD runs. SIGINT, SIGTERM,
//! SIGHUP and SIGQUIT are forwarded to CMD. The exit status is CMD's (128 + the signal when a
//! signal ended it). If the broker is unreachable or says no, CMD does not run.

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow};
use clap::Args;
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};
use tonic::transport::Channel;

use super::svid::{pem_all, write_file};
use super::{ConnectArgs, EXIT_USAGE, EvidenceArgs, Failure, ttl_secs};
use crate::api::pb::v1::broker_client::BrokerClient;
use crate::api::pb::v1::{
    BeginTaskRequest, EndTaskRequest, KeepAliveRequest, MintJwtSvidRequest, MintX509SvidRequest,
};
use crate::client::evidence::EvidenceCache;

/// Exit status when CMD could not be started (as shells use for "command not found").
pub const EXIT_NOT_FOUND: u8 = 127;
/// How long gathered evidence is reused: well inside CI tokens' lifetimes (GitHub's last
/// minutes) and the brokers' `max_token_age`.
const EVIDENCE_REUSE: Duration = Duration::from_secs(60);
/// Longest a renewal waits before retrying after a failure.
const RETRY_MAX: Duration = Duration::from_secs(30);

/// `ephemera run` arguments.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Mint a JWT-SVID for this audience into jwt-<audience>.token; repeat for several. With
    /// exactly one, the token is also in EPHEMERA_JWT.
    #[arg(long = "jwt-audience", value_name = "AUDIENCE")]
    pub jwt_audience: Vec<String>,
    /// Mint an X.509-SVID from a locally generated key: svid.pem, svid.key, bundle.pem.
    #[arg(long)]
    pub x509: bool,
    /// Requested lifetime of each credential, e.g. 10m (clamped by the broker).
    #[arg(long)]
    pub ttl: Option<String>,
    /// Longest the task may live, e.g. 1h (clamped by the broker; default: its default).
    #[arg(long)]
    pub max_duration: Option<String>,
    /// A task label, key=value, for policy and listing; repeat for several.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// A scope of the task's declared intent (e.g. tickets:read); repeat for several. Policy
    /// sees them as context.task.scopes.
    #[arg(long = "scope", value_name = "SCOPE")]
    pub scopes: Vec<String>,
    /// Which of your SPIFFE IDs owns the task when you have several.
    #[arg(long)]
    pub spiffe_id: Option<String>,
    /// Where to create the credentials directory (default: $XDG_RUNTIME_DIR, else the system
    /// temporary directory).
    #[arg(long, value_name = "DIR")]
    pub credentials_parent: Option<PathBuf>,
    /// Evidence to present (on every call: begin, mint, renew, keep-alive, end).
    #[command(flatten)]
    pub evidence: EvidenceArgs,
    /// How to reach the broker.
    #[command(flatten)]
    pub conn: ConnectArgs,
    /// The command to run, after `--`.
    #[arg(required = true, last = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not key=value"))?;
    if k.is_empty() {
        return Err(format!("{s:?} has an empty key"));
    }
    Ok((k.to_owned(), v.to_owned()))
}

fn usage(e: impl Into<anyhow::Error>) -> Failure {
    Failure::new(EXIT_USAGE, e)
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The file a JWT-SVID for `aud` is written to: characters other than letters, digits, `.`,
/// `_` and `-` become `_`, and the name is cut to a length every file system takes.
pub fn jwt_file_name(aud: &str) -> String {
    let safe: String = aud
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(200)
        .collect();
    format!("jwt-{safe}.token")
}

/// Everything a run needs to talk to the broker about its task.
struct Session {
    client: BrokerClient<Channel>,
    evidence: EvidenceCache,
    task_id: String,
    spiffe_id: String,
    ttl: Option<u64>,
    audiences: Vec<String>,
    x509: bool,
    dir: PathBuf,
}

/// The credentials directory; removed when dropped.
struct CredentialsDir(PathBuf);

impl Drop for CredentialsDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!(
                "ephemera run: cannot remove {}: {e}",
                self.0.to_string_lossy()
            );
        }
    }
}

/// Runs `ephemera run`; returns CMD's exit status.
pub async fn run(args: RunArgs) -> Result<u8, Failure> {
    if args.evidence.join_token.is_some() {
        return Err(usage(anyhow!(
            "ephemera run presents evidence on every call (begin, mint, renew, keep-alive, end) and a join token is single use; run it over the broker's Unix socket or with OIDC evidence"
        )));
    }
    let ttl = ttl_secs(args.ttl.as_deref())?;
    let max_duration = args
        .max_duration
        .as_deref()
        .map(|d| {
            crate::config::parse_duration(d)
                .map(|d| d.as_secs())
                .map_err(|e| usage(anyhow!("--max-duration: {e}")))
        })
        .transpose()?;
    let mut labels = HashMap::new();
    for (k, v) in &args.labels {
        if labels.insert(k.clone(), v.clone()).is_some() {
            return Err(usage(anyhow!("--label {k} given twice")));
        }
    }
    let mut files = HashMap::new();
    for aud in &args.jwt_audience {
        if let Some(other) = files.insert(jwt_file_name(aud), aud) {
            return Err(usage(anyhow!(
                "--jwt-audience {aud:?} and {other:?} would share the file {}",
                jwt_file_name(aud)
            )));
        }
    }

    let evidence = EvidenceCache::new(args.evidence.options(), EVIDENCE_REUSE);
    let mut client = args.conn.options().broker().await?;
    let begun = client
        .begin_task(evidence.get().await?.request(BeginTaskRequest {
            max_duration_seconds: max_duration,
            labels,
            spiffe_id: args.spiffe_id.clone().unwrap_or_default(),
            scopes: args.scopes.clone(),
        }))
        .await?
        .into_inner();

    let parent = args.credentials_parent.clone().unwrap_or_else(|| {
        std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_dir())
            .unwrap_or_else(std::env::temp_dir)
    });
    let dir = parent.join(format!(
        "ephemera-run-{}",
        jwt_file_name(&begun.task_id)
            .trim_start_matches("jwt-")
            .trim_end_matches(".token")
    ));
    let mut session = Session {
        client,
        evidence,
        task_id: begun.task_id,
        spiffe_id: begun.spiffe_id,
        ttl,
        audiences: args.jwt_audience,
        x509: args.x509,
        dir,
    };
    let outcome = session
        .supervise(
            &args.command,
            Duration::from_secs(begun.heartbeat_interval_seconds.max(1)),
        )
        .await;
    session.end().await;
    outcome
}

impl Session {
    /// Everything between `BeginTask` and `EndTask`.
    async fn supervise(
        &mut self,
        command: &[OsString],
        heartbeat: Duration,
    ) -> Result<u8, Failure> {
        // Created here, not with `recursive`: an existing path (someone else's) is an error.
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        let dir = CredentialsDir(self.dir.clone());
        let (ended_tx, mut ended) = watch::channel(None::<String>);
        let keeper = tokio::spawn(keep_alive(
            self.client.clone(),
            self.evidence.clone(),
            self.task_id.clone(),
            heartbeat,
            ended_tx,
        ));
        let _keeper = AbortOnDrop(keeper);

        let mut renew_at = self.mint().await?;
        let (program, rest) = command
            .split_first()
            .ok_or_else(|| usage(anyhow!("no command given after --")))?;
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(rest)
            .env("EPHEMERA_CREDENTIALS_DIR", &dir.0)
            .env("EPHEMERA_TASK_ID", &self.task_id)
            .env("EPHEMERA_SPIFFE_ID", &self.spiffe_id)
            .kill_on_drop(true);
        if let [aud] = self.audiences.as_slice() {
            let token = std::fs::read_to_string(dir.0.join(jwt_file_name(aud)))
                .context("reading the minted token")?;
            cmd.env("EPHEMERA_JWT", token.trim());
        }
        let mut child = cmd.spawn().map_err(|e| {
            Failure::new(
                EXIT_NOT_FOUND,
                anyhow!("cannot run {}: {e}", program.to_string_lossy()),
            )
        })?;
        let pid = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .and_then(rustix::process::Pid::from_raw);

        let mut signals = Vec::new();
        for (kind, sig) in [
            (SignalKind::interrupt(), rustix::process::Signal::INT),
            (SignalKind::terminate(), rustix::process::Signal::TERM),
            (SignalKind::hangup(), rustix::process::Signal::HUP),
            (SignalKind::quit(), rustix::process::Signal::QUIT),
        ] {
            signals.push((signal(kind).context("installing signal handlers")?, sig));
        }
        let (sig_tx, mut sig_rx) = mpsc::channel(8);
        let _forwarders: Vec<_> = signals
            .into_iter()
            .map(|(mut stream, sig)| {
                let tx = sig_tx.clone();
                AbortOnDrop(tokio::spawn(async move {
                    while stream.recv().await.is_some() {
                        if tx.send(sig).await.is_err() {
                            break;
                        }
                    }
                }))
            })
            .collect();

        let mut stopped_for_end = false;
        let status = loop {
            let sleep = tokio::time::sleep_until(renew_at);
            tokio::select! {
                status = child.wait() => break status.context("waiting for the command")?,
                Some(sig) = sig_rx.recv() => {
                    if let Some(pid) = pid {
                        let _ = rustix::process::kill_process(pid, sig);
                    }
                }
                () = sleep => {
                    renew_at = match self.mint().await {
                        Ok(at) => at,
                        Err(f) => {
                            eprintln!("ephemera run: renewing credentials failed, retrying: {:#}", f.error);
                            tokio::time::Instant::now() + RETRY_MAX.min(heartbeat)
                        }
                    };
                }
                Ok(()) = ended.changed(), if !stopped_for_end => {
                    let why = ended.borrow().clone().unwrap_or_default();
                    eprintln!("ephemera run: task {} ended by the broker ({why}); its credentials are revoked, stopping the command", self.task_id);
                    stopped_for_end = true;
                    if let Some(pid) = pid {
                        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
                    }
                }
            }
        };
        drop(dir);
        Ok(exit_status(status))
    }

    /// Mints the credentials asked for into the directory; returns when to renew them.
    async fn mint(&mut self) -> Result<tokio::time::Instant, Failure> {
        let mut earliest = i64::MAX;
        if self.x509 {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).context("generating key")?;
            let csr = CertificateParams::default()
                .serialize_request(&key)
                .context("creating CSR")?;
            let ev = self.evidence.get().await?;
            let resp = self
                .client
                .mint_x509_svid(ev.request(MintX509SvidRequest {
                    csr: csr.der().to_vec(),
                    ttl_seconds: self.ttl,
                    spiffe_id: self.spiffe_id.clone(),
                    task_id: self.task_id.clone(),
                }))
                .await?
                .into_inner();
            // The key first: a reader that sees the new certificate finds its key in place.
            write_file(
                &self.dir.join("svid.key"),
                key.serialize_pem().as_bytes(),
                0o600,
            )?;
            write_file(
                &self.dir.join("svid.pem"),
                pem_all("CERTIFICATE", &resp.cert_chain).as_bytes(),
                0o600,
            )?;
            write_file(
                &self.dir.join("bundle.pem"),
                pem_all("CERTIFICATE", &resp.bundle).as_bytes(),
                0o600,
            )?;
            earliest = earliest.min(resp.expires_at);
        }
        for aud in &self.audiences {
            let ev = self.evidence.get().await?;
            let resp = self
                .client
                .mint_jwt_svid(ev.request(MintJwtSvidRequest {
                    audience: vec![aud.clone()],
                    ttl_seconds: self.ttl,
                    spiffe_id: self.spiffe_id.clone(),
                    task_id: self.task_id.clone(),
                }))
                .await?
                .into_inner();
            write_file(
                &self.dir.join(jwt_file_name(aud)),
                resp.token.as_bytes(),
                0o600,
            )?;
            earliest = earliest.min(resp.expires_at);
        }
        Ok(renewal_time(earliest, unix_now()))
    }

    /// Ends the task; on failure the broker ends it when the keep-alive grace runs out.
    async fn end(&mut self) {
        let result = match self.evidence.get().await {
            Ok(ev) => self
                .client
                .end_task(ev.request(EndTaskRequest {
                    task_id: self.task_id.clone(),
                }))
                .await
                .map(|_| ())
                .map_err(|s| format!("{:?}: {}", s.code(), s.message())),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = result {
            eprintln!(
                "ephemera run: cannot end task {} ({e}); the broker ends it when its keep-alive grace runs out",
                self.task_id
            );
        }
    }
}

/// Renew at half the remaining lifetime; nothing to renew means never (in practice: a day).
fn renewal_time(expires_at: i64, now: i64) -> tokio::time::Instant {
    let secs = if expires_at == i64::MAX {
        86_400
    } else {
        u64::try_from((expires_at - now) / 2).unwrap_or(0).max(1)
    };
    tokio::time::Instant::now() + Duration::from_secs(secs)
}

/// A shell-style exit status: the code, or 128 + the signal that ended the process.
fn exit_status(status: std::process::ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code & 0xff).unwrap_or(1),
        (None, Some(sig)) => u8::try_from(128 + (sig & 0x7f)).unwrap_or(1),
        (None, None) => 1,
    }
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Whether a keep-alive error means the task is over (rather than the broker being away).
fn task_over(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::FailedPrecondition | tonic::Code::NotFound | tonic::Code::PermissionDenied
    )
}

/// Keeps the task alive, reconnecting while the broker is away; reports the end of the task.
async fn keep_alive(
    mut client: BrokerClient<Channel>,
    evidence: EvidenceCache,
    task_id: String,
    heartbeat: Duration,
    ended: watch::Sender<Option<String>>,
) {
    loop {
        let attempt = async {
            let ev = evidence.get().await.map_err(|e| e.to_string())?;
            let (tx, rx) = mpsc::channel(2);
            let _ = tx
                .send(KeepAliveRequest {
                    task_id: task_id.clone(),
                })
                .await;
            let mut inbound = match client
                .keep_alive(ev.request(tokio_stream::wrappers::ReceiverStream::new(rx)))
                .await
            {
                Ok(r) => r.into_inner(),
                Err(s) if task_over(&s) => return Ok(s.message().to_owned()),
                Err(s) => return Err(s.message().to_owned()),
            };
            let mut ticks =
                tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticks.tick() => {
                        if tx.send(KeepAliveRequest { task_id: String::new() }).await.is_err() {
                            return Err("keep-alive stream closed".to_owned());
                        }
                    }
                    msg = inbound.message() => match msg {
                        Ok(Some(_)) => {}
                        Ok(None) => return Err("keep-alive stream ended".to_owned()),
                        Err(s) if task_over(&s) => return Ok(s.message().to_owned()),
                        Err(s) => return Err(s.message().to_owned()),
                    }
                }
            }
        };
        match attempt.await {
            Ok(why) => {
                let _ = ended.send(Some(why));
                return;
            }
            Err(why) => {
                tracing::debug!(task_id = %task_id, reason = %why, "keep-alive interrupted; reconnecting");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_are_safe() {
        assert_eq!(jwt_file_name("deploy"), "jwt-deploy.token");
        assert_eq!(
            jwt_file_name("https://vault.example.com/v1"),
            "jwt-https___vault.example.com_v1.token"
        );
        assert_eq!(jwt_file_name("../../etc"), "jwt-.._.._etc.token");
        assert!(jwt_file_name(&"a".repeat(256)).len() < 255);
    }

    #[test]
    fn labels() {
        assert_eq!(parse_label("env=prod"), Ok(("env".into(), "prod".into())));
        assert_eq!(parse_label("k=a=b"), Ok(("k".into(), "a=b".into())));
        assert!(parse_label("novalue").is_err());
        assert!(parse_label("=x").is_err());
    }

    #[test]
    fn statuses() {
        use std::process::ExitStatus;
        assert_eq!(exit_status(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_status(ExitStatus::from_raw(9)), 137);
        assert_eq!(exit_status(ExitStatus::from_raw(15)), 143);
    }
}
