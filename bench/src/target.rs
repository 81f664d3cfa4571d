//! The broker under test: in-process (its own runtime, threads named `ephemera-broker`) or a running one, and broker processes started from a prepared data directory.

use crate::*;

/// A local OIDC issuer whose token authenticates TCP clients of the in-process broker.
pub(crate) struct BenchIssuer {
    pub(crate) jwks: String,
    pub(crate) token: String,
}

pub(crate) const BENCH_ISSUER: &str = "https://bench.ephemera.invalid";
pub(crate) const BENCH_AUDIENCE: &str = "ephemera-bench";

impl BenchIssuer {
    pub(crate) fn new() -> anyhow::Result<Self> {
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
pub(crate) struct Target {
    pub(crate) socket: PathBuf,
    pub(crate) workload_socket: Option<PathBuf>,
    pub(crate) tcp: Option<(String, PathBuf)>,
    pub(crate) http: Option<String>,
    pub(crate) tcp_evidence: Option<Evidence>,
    pub(crate) admin_token: Option<String>,
    pub(crate) cpu: BrokerCpu,
    // Kept alive for the run.
    pub(crate) _runtime: Option<tokio::runtime::Runtime>,
    pub(crate) _running: Option<ephemera::app::Running>,
    pub(crate) _dir: Option<tempfile::TempDir>,
}

pub(crate) fn store_config(url: Option<&str>) -> String {
    url.map(|u| {
        format!(
            "\n[store]\nurl = {}\nmax_connections = 8\n",
            toml::Value::String(u.to_owned())
        )
    })
    .unwrap_or_default()
}

/// Starts a broker on its own runtime (threads named `ephemera-broker`).
pub(crate) async fn in_process(store_url: Option<&str>) -> anyhow::Result<Target> {
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

pub(crate) fn remote(args: &Args) -> anyhow::Result<Target> {
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
pub(crate) enum Transport {
    /// The broker API over TLS on loopback TCP.
    Tcp,
    /// The broker API on its Unix socket.
    Unix,
    /// The SPIFFE Workload API on its Unix socket.
    Workload,
}

impl Transport {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Unix => "unix",
            Self::Workload => "workload",
        }
    }
}

impl Target {
    pub(crate) async fn channel(&self, t: Transport) -> anyhow::Result<Channel> {
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

    pub(crate) fn request<T>(&self, t: Transport, msg: T) -> tonic::Request<T> {
        match (t, &self.tcp_evidence) {
            (Transport::Tcp, Some(ev)) => ev.request(msg),
            _ => tonic::Request::new(msg),
        }
    }

    pub(crate) fn admin<T>(&self, msg: T) -> anyhow::Result<tonic::Request<T>> {
        let token = self.admin_token.as_ref().context("no admin token")?;
        let mut req = tonic::Request::new(msg);
        req.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse()?);
        Ok(req)
    }
}

/// A broker process (`ephemera serve`) on a prepared data directory.
pub(crate) struct Child {
    pub(crate) child: std::process::Child,
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn ephemera_binary() -> anyhow::Result<PathBuf> {
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

pub(crate) async fn wait_ready(
    http_base: &str,
    child: &mut std::process::Child,
) -> anyhow::Result<()> {
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

/// Starts `ephemera serve` on `opts` (already prepared in `data`) and waits until it is ready.
pub(crate) async fn serve(
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
pub(crate) async fn broker_process(
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
