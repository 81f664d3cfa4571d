//! Broker configuration: one TOML file, parsed into [`RawConfig`] and validated into [`Config`].
//!
//! Every problem is reported at once, each naming its key: unknown keys are collected while
//! deserializing (instead of stopping at the first), and validation of every value runs to the
//! end before failing. Relative paths are resolved against the config file's directory.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::attest::claims::{ClaimPath, MatchValue};
use crate::attest::jwks::{Alg, JwksSource};
use crate::broker::mint::TtlLimits;
use crate::broker::{TaskSettings, WorkloadApiSettings};
use crate::httpc::check_url;
use crate::id::{TrustDomain, Ttl};
use crate::policy::mapping::MappingRule;
use crate::secret::Secret;
use crate::store::postgres::PostgresConfig;

/// Default gRPC TCP listen address.
pub const DEFAULT_GRPC_LISTEN: &str = "127.0.0.1:8443";
/// Default HTTP listen address.
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:8080";
/// Default largest gRPC message accepted, in bytes.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// The configuration exactly as written, before validation.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawConfig {
    /// Trust domain of every SPIFFE ID this broker issues.
    pub trust_domain: Option<String>,
    /// Directory with keys, sockets and `endpoints.json`.
    pub data_dir: Option<PathBuf>,
    /// The gRPC listeners.
    pub grpc: RawGrpc,
    /// The HTTP listener.
    pub http: RawHttp,
    /// X.509-SVID lifetimes.
    pub x509_svid: RawTtls,
    /// JWT-SVID lifetimes and issuer.
    pub jwt_svid: RawJwt,
    /// Logging.
    pub log: RawLog,
    /// Task timing.
    pub tasks: RawTasks,
    /// Per-identity quotas.
    pub limits: RawLimits,
    /// Cedar policy.
    pub policy: RawPolicy,
    /// Trusted OIDC issuers.
    pub oidc: Vec<RawOidc>,
    /// mTLS client certificate attestation.
    pub x509pop: RawX509Pop,
    /// The Admin API.
    pub admin: RawAdmin,
    /// The SPIFFE Workload API.
    pub workload_api: RawWorkloadApi,
    /// Where durable state lives.
    pub store: RawStore,
    /// Identity-mapping rules, tried in order.
    pub mapping: Vec<RawMapping>,
    /// The CA's signing keys.
    pub ca: RawCa,
}

/// `[ca]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawCa {
    /// `"offline"` (default): an operator signs the next intermediates on the root's machine;
    /// `"online"`: the broker holds `root-ca.key` and signs them itself.
    pub root_key: Option<String>,
    /// Lifetime of each root the broker makes when the root is online (default "3650d").
    pub root_ttl: Option<String>,
    /// Lifetime of each intermediate the broker signs (default "365d").
    pub intermediate_ttl: Option<String>,
    /// Lifetime of each JWT signing key (default "30d").
    pub jwt_key_ttl: Option<String>,
}

/// `[limits]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawLimits {
    /// Sustained requests per second per SPIFFE ID (0: unlimited). Counts mints, `BeginTask`
    /// and Workload API calls; ending a task or keeping it alive is never refused for rate.
    pub requests_per_second: Option<u32>,
    /// Requests an idle identity may make at once.
    pub burst: Option<u32>,
    /// Active tasks one SPIFFE ID may own (0: unlimited).
    pub max_active_tasks_per_identity: Option<u64>,
    /// Credentials one task may hold (0: unlimited).
    pub max_leases_per_task: Option<u64>,
}

/// `[store]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawStore {
    /// `postgres://...` (several brokers on one database); absent: SQLite in the data directory.
    pub url: Option<String>,
    /// A file holding the URL (e.g. a mounted secret, since the URL may carry a password).
    pub url_file: Option<PathBuf>,
    /// Most connections per broker.
    pub max_connections: Option<u32>,
    /// Connections kept open when idle.
    pub min_connections: Option<u32>,
    /// How long a request waits for a free connection before failing with `Unavailable`.
    pub acquire_timeout: Option<String>,
}

/// Where durable state lives.
#[derive(Debug, Clone)]
pub enum StoreConfig {
    /// SQLite, one file (one broker).
    Sqlite {
        /// The database file.
        path: PathBuf,
    },
    /// PostgreSQL (one or more brokers).
    Postgres(PostgresConfig),
}

/// `[tasks]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawTasks {
    /// Task lifetime when the caller asks for none.
    pub default_duration: Option<String>,
    /// Longest task lifetime.
    pub max_duration: Option<String>,
    /// Keep-alive interval.
    pub heartbeat_interval: Option<String>,
    /// Grace after a missed keep-alive.
    pub grace: Option<String>,
    /// How long ended tasks and expired leases are kept.
    pub retention: Option<String>,
}

/// `[workload_api]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawWorkloadApi {
    /// Serve it (default true).
    pub enabled: Option<bool>,
    /// Its Unix socket.
    pub socket: Option<PathBuf>,
    /// Largest CRL (DER bytes) carried in responses (default 2 MiB; 0 never carries one).
    pub crl_max_bytes: Option<usize>,
    /// Shortest time from a stream's last response to a CRL-only update (default "1s").
    pub crl_push_interval: Option<String>,
}

/// `[admin]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawAdmin {
    /// The admin token file.
    pub token_file: Option<PathBuf>,
    /// Admin SPIFFE IDs (mTLS with an SVID of this broker's CA).
    pub spiffe_ids: Vec<String>,
}

/// `[x509pop]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawX509Pop {
    /// PEM files of the CAs client certificates must chain to.
    pub ca_bundles: Vec<PathBuf>,
}

/// One `[[oidc]]` issuer as written.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawOidc {
    /// Exact `iss` value.
    pub issuer: Option<String>,
    /// JWKS URL.
    pub jwks_url: Option<String>,
    /// JWKS file.
    pub jwks_file: Option<PathBuf>,
    /// PEM trust anchors for `jwks_url`.
    pub jwks_ca_file: Option<PathBuf>,
    /// Accepted audiences.
    pub audiences: Vec<String>,
    /// Accepted algorithms.
    pub algorithms: Option<Vec<String>>,
    /// Oldest `iat` accepted.
    pub max_token_age: Option<String>,
    /// Longest a token may still be valid for (`exp` − now); a later `exp` is refused.
    pub max_token_lifetime: Option<String>,
    /// Tolerance for time claims.
    pub clock_skew: Option<String>,
    /// Least time between JWKS refetches for unknown key ids.
    pub jwks_refetch_interval: Option<String>,
    /// Claim path → required value(s).
    pub required_claims: BTreeMap<String, toml::Value>,
}

/// A validated OIDC issuer.
#[derive(Debug, Clone)]
pub struct OidcConfig {
    /// Exact `iss` value.
    pub issuer: String,
    /// Where its keys come from.
    pub jwks: JwksSource,
    /// Accepted audiences (at least one).
    pub audiences: Vec<String>,
    /// Accepted algorithms.
    pub algorithms: Vec<Alg>,
    /// Oldest `iat` accepted.
    pub max_token_age: Option<Duration>,
    /// Longest remaining validity (`exp` − now) accepted.
    pub max_token_lifetime: Duration,
    /// Tolerance for `exp`, `nbf`, `iat`.
    pub clock_skew: Duration,
    /// Least time between refetches for unknown key ids.
    pub jwks_refetch_interval: Duration,
    /// Claims that must have given values.
    pub required_claims: Vec<(ClaimPath, MatchValue)>,
}

/// `[policy]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawPolicy {
    /// Directory of `*.cedar` files.
    pub dir: Option<PathBuf>,
}

/// `[grpc]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawGrpc {
    /// TCP listen address.
    pub listen: Option<String>,
    /// Unix socket path.
    pub socket: Option<PathBuf>,
    /// Serve plaintext gRPC on TCP (loopback only).
    pub insecure_plaintext: Option<bool>,
    /// DNS names and IP addresses in the serving certificate.
    pub server_names: Option<Vec<String>>,
    /// Largest message accepted.
    pub max_message_bytes: Option<usize>,
    /// Time for a new connection (after its TLS handshake) to send the HTTP/2 preface.
    pub preface_timeout: Option<String>,
    /// A connection with no open stream for this long is closed.
    pub idle_timeout: Option<String>,
    /// Interval of HTTP/2 keep-alive pings, which find dead peers under long streams.
    pub keepalive_interval: Option<String>,
    /// How long a keep-alive ping may go unanswered before the connection is closed.
    pub keepalive_timeout: Option<String>,
}

/// `[http]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawHttp {
    /// TCP listen address.
    pub listen: Option<String>,
    /// Public base URL.
    pub public_url: Option<String>,
    /// Time for a client to send a request's whole header.
    pub header_read_timeout: Option<String>,
    /// A connection with no request for this long is closed.
    pub idle_timeout: Option<String>,
}

/// `[x509_svid]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawTtls {
    /// Lifetime when the caller asks for none.
    pub default_ttl: Option<String>,
    /// Longest lifetime granted.
    pub max_ttl: Option<String>,
}

/// `[jwt_svid]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawJwt {
    /// Lifetime when the caller asks for none.
    pub default_ttl: Option<String>,
    /// Longest lifetime granted.
    pub max_ttl: Option<String>,
    /// The `iss` claim.
    pub issuer: Option<String>,
}

/// `[log]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawLog {
    /// `tracing` filter directive.
    pub level: Option<String>,
    /// `text` or `json`.
    pub format: Option<String>,
}

/// One `[[mapping]]` rule as written.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct RawMapping {
    /// Attestor whose identities this rule maps.
    pub attestor: String,
    /// SPIFFE ID template.
    pub spiffe_id: String,
    /// Claim path → required value (or list of accepted values).
    #[serde(rename = "match")]
    pub matches: BTreeMap<String, toml::Value>,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Trust domain of every SPIFFE ID issued.
    pub trust_domain: TrustDomain,
    /// Directory with keys, sockets and `endpoints.json`.
    pub data_dir: PathBuf,
    /// gRPC listeners.
    pub grpc: GrpcConfig,
    /// HTTP listener.
    pub http: HttpConfig,
    /// X.509-SVID lifetimes.
    pub x509_svid: TtlLimits,
    /// JWT-SVID lifetimes.
    pub jwt_svid: TtlLimits,
    /// The JWT `iss` claim; `None` uses the HTTP public URL.
    pub jwt_issuer: Option<String>,
    /// Logging.
    pub log: LogConfig,
    /// Directory of Cedar policy files (`*.cedar`).
    pub policy_dir: PathBuf,
    /// Trusted OIDC issuers.
    pub oidc: Vec<OidcConfig>,
    /// CA bundles for mTLS client certificates; empty disables the `x509pop` attestor.
    pub x509pop_ca_bundles: Vec<PathBuf>,
    /// The admin token file (mode 0600); missing disables the Admin API.
    pub admin_token_file: PathBuf,
    /// Admin SPIFFE IDs, accepted over mTLS with an X.509-SVID of this broker's CA.
    pub admin_spiffe_ids: Vec<String>,
    /// Where durable state lives.
    pub store: StoreConfig,
    /// The SPIFFE Workload API socket; `None` when disabled.
    pub workload_socket: Option<PathBuf>,
    /// How the Workload API streams carry the CRL.
    pub workload_api: WorkloadApiSettings,
    /// Identity-mapping rules, tried in order.
    pub mappings: Vec<MappingRule>,
    /// The file this configuration was read from, if any (watched for mapping changes).
    pub source: Option<PathBuf>,
    /// Task timing.
    pub tasks: TaskSettings,
    /// Per-identity quotas.
    pub quotas: crate::quota::QuotaSettings,
    /// The signing-key schedule.
    pub ca: crate::ca::CaSettings,
}

/// gRPC listener settings.
#[derive(Debug, Clone)]
pub struct GrpcConfig {
    /// TCP listen address.
    pub listen: SocketAddr,
    /// Unix socket path.
    pub socket: PathBuf,
    /// Plaintext on TCP; only ever true for a loopback `listen`.
    pub insecure_plaintext: bool,
    /// Names in the serving certificate.
    pub server_names: Vec<ServerName>,
    /// Largest message accepted, in bytes.
    pub max_message_bytes: usize,
    /// Connection bounds.
    pub timeouts: GrpcTimeouts,
}

/// How long gRPC connections may take to start, stay idle, and leave a ping unanswered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrpcTimeouts {
    /// From accept (after the TLS handshake) to the whole HTTP/2 preface.
    pub preface: Duration,
    /// With no open stream for this long, a connection is closed.
    pub idle: Duration,
    /// HTTP/2 keep-alive ping interval.
    pub keepalive_interval: Duration,
    /// How long a ping may go unanswered.
    pub keepalive_timeout: Duration,
}

impl Default for GrpcTimeouts {
    fn default() -> Self {
        Self {
            preface: Duration::from_secs(10),
            idle: Duration::from_secs(300),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(20),
        }
    }
}

/// How long HTTP connections may take to send a request header and stay idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpTimeouts {
    /// Time for a request's whole header, from the connection's start or the last response.
    pub header_read: Duration,
    /// A connection with no request for this long is closed.
    pub idle: Duration,
}

impl Default for HttpTimeouts {
    fn default() -> Self {
        Self {
            header_read: Duration::from_secs(10),
            idle: Duration::from_secs(60),
        }
    }
}

/// A duration setting between `min` and `max`, or `default` when absent.
fn bounded_duration(
    p: &mut Problems,
    key: &str,
    raw: Option<&str>,
    default: Duration,
    (min, max): (Duration, Duration),
) -> Duration {
    match raw.map(parse_duration) {
        None => default,
        Some(Ok(d)) if d >= min && d <= max => d,
        Some(Ok(_)) => {
            p.push(
                key,
                format!(
                    "must be between {}s and {}s",
                    min.as_secs_f64(),
                    max.as_secs()
                ),
            );
            default
        }
        Some(Err(e)) => {
            p.push(key, e);
            default
        }
    }
}

/// A name the serving certificate is valid for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerName {
    /// A DNS name.
    Dns(String),
    /// An IP address.
    Ip(IpAddr),
}

/// HTTP listener settings.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// TCP listen address.
    pub listen: SocketAddr,
    /// Base URL relying parties use; `None` derives it from the bound address.
    pub public_url: Option<String>,
    /// Connection bounds.
    pub timeouts: HttpTimeouts,
}

/// Logging settings.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// `tracing` filter directive, e.g. `info` or `ephemera=debug`.
    pub level: String,
    /// Output format.
    pub format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// One configuration problem, naming its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// Dotted key, e.g. `x509_svid.max_ttl` or `mapping[0].spiffe_id`.
    pub key: String,
    /// What is wrong, lowercase.
    pub message: String,
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML, or a value has the wrong type.
    #[error("config is not valid: {0}")]
    Syntax(String),
    /// One or more values are invalid; all of them are listed.
    #[error("config has {} problem(s):\n{}", .0.len(), list(.0))]
    Invalid(Vec<ConfigProblem>),
}

fn list(problems: &[ConfigProblem]) -> String {
    problems
        .iter()
        .map(|p| format!("  - {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl ConfigError {
    /// The individual problems (empty for read and syntax errors).
    pub fn problems(&self) -> &[ConfigProblem] {
        match self {
            Self::Invalid(p) => p,
            _ => &[],
        }
    }
}

/// Parses a duration such as `90s`, `5m`, `1h30m` or `2d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("duration is empty".into());
    }
    // Milliseconds, so that every unit is a whole number of them.
    let mut total: u64 = 0;
    let mut digits = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit: u64 = match c {
            'm' if chars.peek() == Some(&'s') => {
                chars.next();
                1
            }
            's' => 1000,
            'm' => 60_000,
            'h' => 3_600_000,
            'd' => 86_400_000,
            _ => {
                return Err(format!(
                    "invalid duration {s:?}: unknown unit {c:?} (use ms, s, m, h or d, e.g. \"90s\", \"1h30m\")"
                ));
            }
        };
        if digits.is_empty() {
            return Err(format!(
                "invalid duration {s:?}: unit {c:?} without a number"
            ));
        }
        let n: u64 = digits
            .parse()
            .map_err(|_| format!("invalid duration {s:?}: number too large"))?;
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| format!("invalid duration {s:?}: too large"))?;
        digits.clear();
    }
    if !digits.is_empty() {
        return Err(format!(
            "invalid duration {s:?}: missing unit after {digits} (use s, m, h or d, e.g. \"{digits}s\")"
        ));
    }
    Ok(Duration::from_millis(total))
}

/// Collects problems while validating.
#[derive(Default)]
struct Problems(Vec<ConfigProblem>);

impl Problems {
    fn push(&mut self, key: impl Into<String>, message: impl fmt::Display) {
        self.0.push(ConfigProblem {
            key: key.into(),
            message: message.to_string(),
        });
    }

    /// Runs a parse, recording its error under `key`.
    fn check<T, E: fmt::Display>(&mut self, key: &str, r: Result<T, E>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.push(key, e);
                None
            }
        }
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut config = Self::from_toml(&text, base)?;
        config.source = Some(path.to_owned());
        Ok(config)
    }

    /// Parses and validates TOML text; relative paths resolve against `base_dir`.
    pub fn from_toml(text: &str, base_dir: &Path) -> Result<Self, ConfigError> {
        let mut unknown = Vec::new();
        let de = toml::Deserializer::parse(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        let raw: RawConfig = serde_ignored::deserialize(de, |path| unknown.push(path.to_string()))
            .map_err(|e| ConfigError::Syntax(e.to_string()))?;
        let mut problems = Problems::default();
        for key in unknown {
            problems.push(key, "unknown key");
        }
        Self::validate(raw, base_dir, problems)
    }

    /// Validates an in-memory raw config (used by `ephemera dev`).
    pub fn from_raw(raw: RawConfig, base_dir: &Path) -> Result<Self, ConfigError> {
        Self::validate(raw, base_dir, Problems::default())
    }

    fn validate(raw: RawConfig, base: &Path, mut p: Problems) -> Result<Self, ConfigError> {
        let trust_domain = match &raw.trust_domain {
            None => {
                p.push("trust_domain", "is required (e.g. \"example.org\")");
                None
            }
            Some(td) => p.check("trust_domain", td.parse::<TrustDomain>()),
        };
        let data_dir = match raw.data_dir {
            None => {
                p.push("data_dir", "is required (e.g. \"/var/lib/ephemera\")");
                None
            }
            Some(d) => Some(base.join(d)),
        };

        let grpc_listen = p.check(
            "grpc.listen",
            parse_addr(raw.grpc.listen.as_deref().unwrap_or(DEFAULT_GRPC_LISTEN)),
        );
        let insecure_plaintext = raw.grpc.insecure_plaintext.unwrap_or(false);
        if let (true, Some(addr)) = (insecure_plaintext, grpc_listen)
            && !addr.ip().is_loopback()
        {
            p.push(
                "grpc.insecure_plaintext",
                format!("plaintext is allowed only on a loopback address, not {addr}"),
            );
        }
        if insecure_plaintext && !raw.x509pop.ca_bundles.is_empty() {
            p.push(
                "x509pop.ca_bundles",
                "client certificates need TLS: remove grpc.insecure_plaintext",
            );
        }
        let server_names = raw
            .grpc
            .server_names
            .unwrap_or_else(|| vec!["localhost".into(), "127.0.0.1".into(), "::1".into()]);
        let mut names = Vec::new();
        for (i, n) in server_names.iter().enumerate() {
            if let Some(name) = p.check(&format!("grpc.server_names[{i}]"), parse_server_name(n)) {
                names.push(name);
            }
        }
        let max_message_bytes = raw
            .grpc
            .max_message_bytes
            .unwrap_or(DEFAULT_MAX_MESSAGE_BYTES);
        if !(4096..=16 * 1024 * 1024).contains(&max_message_bytes) {
            p.push(
                "grpc.max_message_bytes",
                "must be between 4096 and 16777216",
            );
        }

        let ms = Duration::from_millis;
        let hour = Duration::from_secs(3600);
        let gd = GrpcTimeouts::default();
        let grpc_timeouts = GrpcTimeouts {
            preface: bounded_duration(
                &mut p,
                "grpc.preface_timeout",
                raw.grpc.preface_timeout.as_deref(),
                gd.preface,
                (ms(100), Duration::from_secs(300)),
            ),
            idle: bounded_duration(
                &mut p,
                "grpc.idle_timeout",
                raw.grpc.idle_timeout.as_deref(),
                gd.idle,
                (ms(100), 24 * hour),
            ),
            keepalive_interval: bounded_duration(
                &mut p,
                "grpc.keepalive_interval",
                raw.grpc.keepalive_interval.as_deref(),
                gd.keepalive_interval,
                (Duration::from_secs(1), hour),
            ),
            keepalive_timeout: bounded_duration(
                &mut p,
                "grpc.keepalive_timeout",
                raw.grpc.keepalive_timeout.as_deref(),
                gd.keepalive_timeout,
                (Duration::from_secs(1), hour),
            ),
        };
        let hd = HttpTimeouts::default();
        let http_timeouts = HttpTimeouts {
            header_read: bounded_duration(
                &mut p,
                "http.header_read_timeout",
                raw.http.header_read_timeout.as_deref(),
                hd.header_read,
                (ms(100), Duration::from_secs(300)),
            ),
            idle: bounded_duration(
                &mut p,
                "http.idle_timeout",
                raw.http.idle_timeout.as_deref(),
                hd.idle,
                (ms(100), hour),
            ),
        };
        let http_listen = p.check(
            "http.listen",
            parse_addr(raw.http.listen.as_deref().unwrap_or(DEFAULT_HTTP_LISTEN)),
        );
        let public_url = raw
            .http
            .public_url
            .and_then(|u| p.check("http.public_url", parse_base_url(&u)));
        let jwt_issuer = raw
            .jwt_svid
            .issuer
            .and_then(|u| p.check("jwt_svid.issuer", parse_base_url(&u)));

        let x509_svid = ttl_limits(&mut p, "x509_svid", &raw.x509_svid, "1h", "24h");
        let jwt_svid = ttl_limits(
            &mut p,
            "jwt_svid",
            &RawTtls {
                default_ttl: raw.jwt_svid.default_ttl,
                max_ttl: raw.jwt_svid.max_ttl,
            },
            "5m",
            "1h",
        );

        let level = raw.log.level.unwrap_or_else(|| "info".into());
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&level) {
            p.push("log.level", format!("invalid filter {level:?}: {e}"));
        }
        let format = match raw.log.format.as_deref().unwrap_or("text") {
            "text" => Some(LogFormat::Text),
            "json" => Some(LogFormat::Json),
            other => {
                p.push(
                    "log.format",
                    format!("must be \"text\" or \"json\", not {other:?}"),
                );
                None
            }
        };

        let tasks = task_settings(&mut p, &raw.tasks);
        let ca = ca_settings(&mut p, &raw.ca, x509_svid, jwt_svid);
        let postgres = store_settings(&mut p, &raw.store, base);
        let quotas = quota_settings(&mut p, &raw.limits);
        let mut admin_spiffe_ids = Vec::new();
        for (i, id) in raw.admin.spiffe_ids.iter().enumerate() {
            let key = format!("admin.spiffe_ids[{i}]");
            match (id.parse::<crate::id::SpiffeId>(), &trust_domain) {
                (Ok(sid), Some(td)) if sid.trust_domain() == td.as_str() => {
                    admin_spiffe_ids.push(sid.to_string())
                }
                (Ok(_), Some(td)) => p.push(key, format!("must be in trust domain {td}")),
                (Ok(_), None) => {}
                (Err(e), _) => p.push(key, e),
            }
        }
        if insecure_plaintext && !raw.admin.spiffe_ids.is_empty() {
            p.push(
                "admin.spiffe_ids",
                "admin certificates need TLS: remove grpc.insecure_plaintext",
            );
        }

        let workload_api = workload_api_settings(&mut p, &raw.workload_api);

        let mut oidc = Vec::new();
        for (i, raw) in raw.oidc.iter().enumerate() {
            if let Some(o) = oidc_issuer(&mut p, &format!("oidc[{i}]"), raw, base) {
                if oidc.iter().any(|x: &OidcConfig| x.issuer == o.issuer) {
                    p.push(format!("oidc[{i}].issuer"), "issuer is configured twice");
                }
                oidc.push(o);
            }
        }

        let mut mappings = Vec::new();
        if let Some(td) = &trust_domain {
            for (i, m) in raw.mapping.iter().enumerate() {
                let key = format!("mapping[{i}]");
                let mut matches = BTreeMap::new();
                for (path, value) in &m.matches {
                    match match_value(value) {
                        Some(v) => {
                            matches.insert(path.clone(), v);
                        }
                        None => p.push(
                            format!("{key}.match.{path}"),
                            "must be a string, number, boolean or a list of them",
                        ),
                    }
                }
                match MappingRule::new(&m.attestor, &m.spiffe_id, matches, td) {
                    Ok(rule) => mappings.push(rule),
                    Err(errors) => {
                        for (field, msg) in errors {
                            p.push(format!("{key}.{field}"), msg);
                        }
                    }
                }
            }
        }

        match (
            trust_domain,
            data_dir,
            grpc_listen,
            http_listen,
            x509_svid,
            jwt_svid,
            format,
        ) {
            (
                Some(trust_domain),
                Some(data_dir),
                Some(listen),
                Some(http),
                Some(x),
                Some(j),
                Some(f),
            ) if p.0.is_empty() => {
                let dir = crate::datadir::DataDir::new(&data_dir);
                let socket = raw
                    .grpc
                    .socket
                    .map(|s| base.join(s))
                    .unwrap_or_else(|| dir.broker_socket());
                let policy_dir = raw
                    .policy
                    .dir
                    .map(|d| base.join(d))
                    .unwrap_or_else(|| dir.policies());
                let admin_token_file = raw
                    .admin
                    .token_file
                    .map(|f| base.join(f))
                    .unwrap_or_else(|| dir.admin_token());
                let store = match postgres {
                    Some(pg) => StoreConfig::Postgres(pg),
                    None => StoreConfig::Sqlite {
                        path: dir.database(),
                    },
                };
                let workload_socket = raw.workload_api.enabled.unwrap_or(true).then(|| {
                    raw.workload_api
                        .socket
                        .map(|s| base.join(s))
                        .unwrap_or_else(|| dir.workload_socket())
                });
                Ok(Config {
                    trust_domain,
                    data_dir,
                    grpc: GrpcConfig {
                        listen,
                        socket,
                        insecure_plaintext,
                        server_names: names,
                        max_message_bytes,
                        timeouts: grpc_timeouts,
                    },
                    http: HttpConfig {
                        listen: http,
                        public_url,
                        timeouts: http_timeouts,
                    },
                    x509_svid: x,
                    jwt_svid: j,
                    jwt_issuer,
                    log: LogConfig { level, format: f },
                    policy_dir,
                    oidc,
                    x509pop_ca_bundles: raw
                        .x509pop
                        .ca_bundles
                        .iter()
                        .map(|b| base.join(b))
                        .collect(),
                    admin_token_file,
                    admin_spiffe_ids,
                    store,
                    workload_socket,
                    workload_api,
                    mappings,
                    source: None,
                    tasks,
                    quotas,
                    ca,
                })
            }
            _ => Err(ConfigError::Invalid(p.0)),
        }
    }
}

fn oidc_issuer(p: &mut Problems, key: &str, raw: &RawOidc, base: &Path) -> Option<OidcConfig> {
    let before = p.0.len();
    let issuer = match raw.issuer.as_deref() {
        Some(i) if i.starts_with("https://") || i.starts_with("http://") => Some(i.to_owned()),
        Some(i) => {
            p.push(
                format!("{key}.issuer"),
                format!("{i:?} must be an https:// URL"),
            );
            None
        }
        None => {
            p.push(format!("{key}.issuer"), "is required");
            None
        }
    };
    let jwks = match (&raw.jwks_url, &raw.jwks_file) {
        (Some(url), None) => p
            .check(&format!("{key}.jwks_url"), check_url(url))
            .map(|()| JwksSource::Url {
                url: url.clone(),
                ca_file: raw.jwks_ca_file.as_ref().map(|f| base.join(f)),
            }),
        (None, Some(file)) => Some(JwksSource::File(base.join(file))),
        _ => {
            p.push(
                format!("{key}.jwks_url"),
                "set exactly one of jwks_url and jwks_file",
            );
            None
        }
    };
    if raw.audiences.is_empty() {
        p.push(
            format!("{key}.audiences"),
            "at least one audience is required (the token's aud must name this broker)",
        );
    }
    let algorithms: Vec<Alg> = match &raw.algorithms {
        None => vec![Alg::Rs256, Alg::Es256],
        Some(list) if list.is_empty() => {
            p.push(format!("{key}.algorithms"), "must not be empty");
            Vec::new()
        }
        Some(list) => list
            .iter()
            .enumerate()
            .filter_map(|(j, a)| p.check(&format!("{key}.algorithms[{j}]"), Alg::parse(a)))
            .collect(),
    };
    let duration = |p: &mut Problems, field: &str, v: &Option<String>, default: Option<&str>| {
        v.as_deref()
            .or(default)
            .and_then(|d| p.check(&format!("{key}.{field}"), parse_duration(d)))
    };
    let max_token_age = duration(p, "max_token_age", &raw.max_token_age, None);
    let clock_skew = duration(p, "clock_skew", &raw.clock_skew, Some("30s")).unwrap_or_default();
    let max_token_lifetime = duration(
        p,
        "max_token_lifetime",
        &raw.max_token_lifetime,
        Some("24h"),
    )
    .unwrap_or(Duration::from_secs(86_400));
    if max_token_lifetime < Duration::from_secs(60)
        || max_token_lifetime > Duration::from_secs(30 * 86_400)
    {
        p.push(
            format!("{key}.max_token_lifetime"),
            "must be between 1m and 30d",
        );
    }
    if clock_skew > Duration::from_secs(300) {
        p.push(format!("{key}.clock_skew"), "must be at most 5m");
    }
    let jwks_refetch_interval = duration(
        p,
        "jwks_refetch_interval",
        &raw.jwks_refetch_interval,
        Some("30s"),
    )
    .unwrap_or_default();
    let mut required_claims = Vec::new();
    for (path, value) in &raw.required_claims {
        let field = format!("{key}.required_claims.{path}");
        match (ClaimPath::parse(path), match_value(value)) {
            (Ok(cp), Some(v)) => required_claims.push((cp, v)),
            (Err(e), _) => p.push(field, e),
            (_, None) => p.push(field, "must be a string, number, boolean or a list of them"),
        }
    }
    if p.0.len() != before {
        return None;
    }
    Some(OidcConfig {
        issuer: issuer?,
        jwks: jwks?,
        audiences: raw.audiences.clone(),
        algorithms,
        max_token_age,
        max_token_lifetime,
        clock_skew,
        jwks_refetch_interval,
        required_claims,
    })
}

fn task_settings(p: &mut Problems, raw: &RawTasks) -> TaskSettings {
    let d = TaskSettings::default();
    let mut one = |field: &str, v: &Option<String>, default: Duration, min: u64| {
        let key = format!("tasks.{field}");
        match v.as_deref().map(parse_duration) {
            None => default,
            Some(Ok(x)) if x.as_secs() >= min && x <= Ttl::MAX => x,
            Some(Ok(_)) => {
                p.push(key, format!("must be between {min}s and 30d"));
                default
            }
            Some(Err(e)) => {
                p.push(key, e);
                default
            }
        }
    };
    let s = TaskSettings {
        default_duration: one(
            "default_duration",
            &raw.default_duration,
            d.default_duration,
            1,
        ),
        max_duration: one("max_duration", &raw.max_duration, d.max_duration, 1),
        heartbeat_interval: one(
            "heartbeat_interval",
            &raw.heartbeat_interval,
            d.heartbeat_interval,
            1,
        ),
        grace: one("grace", &raw.grace, d.grace, 1),
        retention: one("retention", &raw.retention, d.retention, 0),
    };
    if s.default_duration > s.max_duration {
        p.push(
            "tasks.default_duration",
            "is longer than tasks.max_duration",
        );
    }
    s
}

/// `[ca]`: the signing-key schedule. Every credential must fit in the last sixth of its key's
/// life (when the key's successor has taken over), so `max_ttl`s are bounded by the key
/// lifetimes.
fn ca_settings(
    p: &mut Problems,
    raw: &RawCa,
    x509: Option<TtlLimits>,
    jwt: Option<TtlLimits>,
) -> crate::ca::CaSettings {
    let d = crate::ca::CaSettings::default();
    let root_online = match raw.root_key.as_deref() {
        None | Some("offline") => false,
        Some("online") => true,
        Some(other) => {
            p.push(
                "ca.root_key",
                format!("must be \"offline\" or \"online\", not {other:?}"),
            );
            false
        }
    };
    let minute = Duration::from_secs(60);
    let decade = Duration::from_secs(10 * 365 * 86_400);
    let root_ttl = bounded_duration(
        p,
        "ca.root_ttl",
        raw.root_ttl.as_deref(),
        d.root_ttl,
        (minute, Duration::from_secs(30 * 365 * 86_400)),
    );
    let intermediate_ttl = bounded_duration(
        p,
        "ca.intermediate_ttl",
        raw.intermediate_ttl.as_deref(),
        d.intermediate_ttl,
        (minute, decade),
    );
    let jwt_key_ttl = bounded_duration(
        p,
        "ca.jwt_key_ttl",
        raw.jwt_key_ttl.as_deref(),
        d.jwt_key_ttl,
        (minute, Duration::from_secs(365 * 86_400)),
    );
    for (key, limits, life, life_key) in [
        (
            "x509_svid.max_ttl",
            x509,
            intermediate_ttl,
            "ca.intermediate_ttl",
        ),
        ("jwt_svid.max_ttl", jwt, jwt_key_ttl, "ca.jwt_key_ttl"),
    ] {
        if let Some(l) = limits
            && l.max_ttl.duration() > life / 6
        {
            p.push(
                key,
                format!(
                    "{}s is longer than a sixth of {life_key} ({}s): a credential must fit in \
                     the time its key is published after its successor takes over",
                    l.max_ttl.duration().as_secs(),
                    (life / 6).as_secs()
                ),
            );
        }
    }
    if root_online && intermediate_ttl > root_ttl / 6 {
        p.push(
            "ca.intermediate_ttl",
            format!(
                "{}s is longer than a sixth of ca.root_ttl ({}s): an intermediate the broker \
                 signs must fit in the time the root is published after its successor takes over",
                intermediate_ttl.as_secs(),
                (root_ttl / 6).as_secs()
            ),
        );
    }
    crate::ca::CaSettings {
        root_ttl,
        intermediate_ttl,
        jwt_key_ttl,
        root_online,
    }
}

/// `[workload_api]`: how its streams carry the CRL.
fn workload_api_settings(p: &mut Problems, raw: &RawWorkloadApi) -> WorkloadApiSettings {
    let d = WorkloadApiSettings::default();
    let crl_max_bytes = raw.crl_max_bytes.unwrap_or(d.crl_max_bytes);
    if crl_max_bytes > MAX_WORKLOAD_CRL_BYTES {
        p.push(
            "workload_api.crl_max_bytes",
            format!(
                "must be at most {MAX_WORKLOAD_CRL_BYTES} (SPIFFE clients refuse messages over 4 MiB by default); 0 leaves the CRL out"
            ),
        );
    }
    let crl_push_interval = match raw.crl_push_interval.as_deref().map(parse_duration) {
        None => d.crl_push_interval,
        Some(Ok(x)) if x <= Duration::from_secs(300) => x,
        Some(Ok(_)) => {
            p.push("workload_api.crl_push_interval", "must be at most 5m");
            d.crl_push_interval
        }
        Some(Err(e)) => {
            p.push("workload_api.crl_push_interval", e);
            d.crl_push_interval
        }
    };
    WorkloadApiSettings {
        crl_max_bytes,
        crl_push_interval,
    }
}

/// Largest `workload_api.crl_max_bytes`: room for the SVIDs, keys and bundle of a response
/// under the 4 MiB limit SPIFFE clients apply by default.
const MAX_WORKLOAD_CRL_BYTES: usize = 3 * 1024 * 1024 + 512 * 1024;

/// `[limits]`.
fn quota_settings(p: &mut Problems, raw: &RawLimits) -> crate::quota::QuotaSettings {
    let d = crate::quota::QuotaSettings::default();
    let requests_per_second = raw.requests_per_second.unwrap_or(d.requests_per_second);
    let burst = raw.burst.unwrap_or(if raw.requests_per_second.is_some() {
        requests_per_second.saturating_mul(2)
    } else {
        d.burst
    });
    if requests_per_second > 0 && burst == 0 {
        p.push(
            "limits.burst",
            "must be at least 1 when requests are limited",
        );
    }
    crate::quota::QuotaSettings {
        requests_per_second,
        burst,
        max_active_tasks_per_identity: raw
            .max_active_tasks_per_identity
            .unwrap_or(d.max_active_tasks_per_identity),
        max_leases_per_task: raw.max_leases_per_task.unwrap_or(d.max_leases_per_task),
    }
}

/// `[store]`: `None` means SQLite.
fn store_settings(p: &mut Problems, raw: &RawStore, base: &Path) -> Option<PostgresConfig> {
    let (url, url_file) = match (&raw.url, &raw.url_file) {
        (Some(_), Some(_)) => {
            p.push(
                "store.url_file",
                "give store.url or store.url_file, not both",
            );
            return None;
        }
        (Some(u), None) => (u.trim().to_owned(), None),
        (None, Some(f)) => (String::new(), Some(base.join(f))),
        (None, None) => {
            if raw.max_connections.is_some()
                || raw.min_connections.is_some()
                || raw.acquire_timeout.is_some()
            {
                p.push("store", "pool settings need store.url (PostgreSQL)");
            }
            return None;
        }
    };
    if url_file.is_none()
        && let Err(e) = crate::store::postgres::connect_options(&url)
    {
        p.push("store.url", e);
        return None;
    }
    let d = PostgresConfig::default();
    let max_connections = raw.max_connections.unwrap_or(d.max_connections);
    if !(1..=1000).contains(&max_connections) {
        p.push("store.max_connections", "must be between 1 and 1000");
    }
    let min_connections = raw.min_connections.unwrap_or(d.min_connections);
    if min_connections > max_connections {
        p.push(
            "store.min_connections",
            "is more than store.max_connections",
        );
    }
    let acquire_timeout = match raw.acquire_timeout.as_deref().map(parse_duration) {
        None => d.acquire_timeout,
        Some(Ok(t)) if t >= Duration::from_secs(1) && t <= Duration::from_secs(60) => t,
        Some(Ok(_)) => {
            p.push("store.acquire_timeout", "must be between 1s and 60s");
            d.acquire_timeout
        }
        Some(Err(e)) => {
            p.push("store.acquire_timeout", e);
            d.acquire_timeout
        }
    };
    Some(PostgresConfig {
        url: Secret::new(url),
        url_file,
        max_connections,
        min_connections,
        acquire_timeout,
    })
}

fn ttl_limits(
    p: &mut Problems,
    section: &str,
    raw: &RawTtls,
    default_ttl: &str,
    max_ttl: &str,
) -> Option<TtlLimits> {
    let mut one = |field: &str, value: Option<&str>, fallback: &str| {
        let key = format!("{section}.{field}");
        let d = p.check(&key, parse_duration(value.unwrap_or(fallback)))?;
        p.check(&key, Ttl::new(d))
    };
    let default = one("default_ttl", raw.default_ttl.as_deref(), default_ttl);
    let max = one("max_ttl", raw.max_ttl.as_deref(), max_ttl);
    let (default_ttl, max_ttl) = (default?, max?);
    if default_ttl > max_ttl {
        p.push(
            format!("{section}.default_ttl"),
            format!(
                "{}s is longer than max_ttl ({}s)",
                default_ttl.as_secs(),
                max_ttl.as_secs()
            ),
        );
        return None;
    }
    Some(TtlLimits {
        default_ttl,
        max_ttl,
    })
}

fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| format!("invalid address {s:?}: expected IP:PORT, e.g. \"127.0.0.1:8443\""))
}

fn parse_server_name(s: &str) -> Result<ServerName, String> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(ServerName::Ip(ip));
    }
    let valid = !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if valid {
        Ok(ServerName::Dns(s.to_ascii_lowercase()))
    } else {
        Err(format!("{s:?} is neither an IP address nor a DNS name"))
    }
}

/// Checks an `http://` or `https://` base URL and strips any trailing slash.
fn parse_base_url(s: &str) -> Result<String, String> {
    let rest = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))
        .ok_or_else(|| format!("{s:?} must start with http:// or https://"))?;
    if rest.is_empty() || rest.contains(['?', '#', ' ']) {
        return Err(format!("{s:?} is not a valid base URL"));
    }
    Ok(s.trim_end_matches('/').to_owned())
}

fn match_value(v: &toml::Value) -> Option<MatchValue> {
    fn scalar(v: &toml::Value) -> Option<String> {
        match v {
            toml::Value::String(s) => Some(s.clone()),
            toml::Value::Integer(i) => Some(i.to_string()),
            toml::Value::Boolean(b) => Some(b.to_string()),
            _ => None,
        }
    }
    match v {
        toml::Value::Array(items) => items
            .iter()
            .map(scalar)
            .collect::<Option<Vec<_>>>()
            .map(MatchValue::AnyOf),
        other => scalar(other).map(MatchValue::Equals),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        trust_domain = "example.org"
        data_dir = "/var/lib/ephemera"
    "#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::from_toml(MINIMAL, Path::new("/etc")).unwrap();
        assert_eq!(c.trust_domain.as_str(), "example.org");
        assert_eq!(c.grpc.listen, DEFAULT_GRPC_LISTEN.parse().unwrap());
        assert_eq!(c.grpc.socket, Path::new("/var/lib/ephemera/broker.sock"));
        assert_eq!(c.x509_svid.default_ttl.as_secs(), 3600);
        assert_eq!(c.jwt_svid.max_ttl.as_secs(), 3600);
        assert!(!c.grpc.insecure_plaintext);
        assert!(c.mappings.is_empty());
        assert_eq!(c.policy_dir, Path::new("/var/lib/ephemera/policies"));
        assert_eq!(c.workload_api, WorkloadApiSettings::default());
        let set =
            format!("{MINIMAL}\n[workload_api]\ncrl_max_bytes = 0\ncrl_push_interval = \"0s\"\n");
        let c = Config::from_toml(&set, Path::new("/etc")).unwrap();
        assert_eq!(
            c.workload_api,
            WorkloadApiSettings {
                crl_max_bytes: 0,
                crl_push_interval: Duration::ZERO,
            }
        );
    }

    #[test]
    fn store_is_sqlite_unless_a_postgres_url_is_given() {
        let c = Config::from_toml(MINIMAL, Path::new("/etc")).unwrap();
        assert!(
            matches!(&c.store, StoreConfig::Sqlite { path } if path == Path::new("/var/lib/ephemera/ephemera.db"))
        );
        let pg = format!(
            "{MINIMAL}\n[store]\nurl = \"postgres://u:s3cret@db:5432/e?sslmode=require\"\nmax_connections = 8\n"
        );
        match Config::from_toml(&pg, Path::new("/etc")).unwrap().store {
            StoreConfig::Postgres(p) => {
                assert_eq!(p.max_connections, 8);
                assert!(
                    !format!("{p:?}").contains("s3cret"),
                    "the password is never shown"
                );
            }
            StoreConfig::Sqlite { .. } => panic!("expected PostgreSQL"),
        }
        let from_file = format!("{MINIMAL}\n[store]\nurl_file = \"secrets/db-url\"\n");
        match Config::from_toml(&from_file, Path::new("/etc"))
            .unwrap()
            .store
        {
            StoreConfig::Postgres(p) => {
                assert_eq!(
                    p.url_file.as_deref(),
                    Some(Path::new("/etc/secrets/db-url"))
                );
            }
            StoreConfig::Sqlite { .. } => panic!("expected PostgreSQL"),
        }
        for (extra, key) in [
            ("url = \"mysql://u:s3cret@db/e\"", "store.url"),
            ("url = \"postgres://a\"\nurl_file = \"f\"", "store.url_file"),
            ("max_connections = 4", "store"),
            (
                "url = \"postgres://db/e\"\nmax_connections = 0",
                "store.max_connections",
            ),
            (
                "url = \"postgres://db/e\"\nacquire_timeout = \"2m\"",
                "store.acquire_timeout",
            ),
        ] {
            let got = problems(&format!("{MINIMAL}\n[store]\n{extra}\n"));
            assert!(got.iter().any(|(k, _)| k == key), "{extra}: {got:?}");
            assert!(!format!("{got:?}").contains("s3cret"), "{got:?}");
        }
    }

    #[test]
    fn durations() {
        let ok = [
            ("90s", 90),
            ("5m", 300),
            ("1h30m", 5400),
            ("2d", 172_800),
            ("0s", 0),
        ];
        for (s, secs) in ok {
            assert_eq!(parse_duration(s), Ok(Duration::from_secs(secs)), "{s}");
        }
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1m500ms"), Ok(Duration::from_millis(60_500)));
        for s in [
            "",
            "5",
            "m",
            "ms",
            "5x",
            "1.5h",
            "-5s",
            "99999999999999999999s",
        ] {
            assert!(parse_duration(s).is_err(), "{s}");
        }
    }

    fn problems(toml: &str) -> Vec<(String, String)> {
        match Config::from_toml(toml, Path::new("/etc")) {
            Ok(_) => panic!("config should be rejected:\n{toml}"),
            Err(e) => e
                .problems()
                .iter()
                .map(|p| (p.key.clone(), p.message.clone()))
                .collect(),
        }
    }

    #[test]
    fn every_problem_is_reported_at_once_with_its_key() {
        let got = problems(
            r#"
            trust_domain = "Example.ORG"
            data_dir = "/d"
            colour = "blue"
            [grpc]
            listen = "0.0.0.0:8443"
            insecure_plaintext = true
            bogus = 1
            [x509_svid]
            max_ttl = "ten minutes"
            [jwt_svid]
            default_ttl = "2h"
            [log]
            format = "xml"
            "#,
        );
        let keys: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "colour",
                "grpc.bogus",
                "trust_domain",
                "grpc.insecure_plaintext",
                "x509_svid.max_ttl",
                "jwt_svid.default_ttl",
                "log.format",
            ],
            "{got:#?}"
        );
        assert_eq!(got[0].1, "unknown key");
        assert!(got[2].1.contains("lowercase"), "{got:?}");
        assert!(got[4].1.contains("unknown unit"), "{got:?}");
    }

    #[test]
    fn rejected_values_table() {
        let rows: &[(&str, &str, &str)] = &[
            ("unknown key", "[http]\nport = 80", "http.port"),
            (
                "bad duration",
                "[jwt_svid]\nmax_ttl = \"5\"",
                "jwt_svid.max_ttl",
            ),
            (
                "zero ttl",
                "[jwt_svid]\ndefault_ttl = \"0s\"",
                "jwt_svid.default_ttl",
            ),
            (
                "ttl above ceiling",
                "[x509_svid]\nmax_ttl = \"31d\"",
                "x509_svid.max_ttl",
            ),
            (
                "bad address",
                "[grpc]\nlisten = \"localhost\"",
                "grpc.listen",
            ),
            (
                "bad server name",
                "[grpc]\nserver_names = [\"a b\"]",
                "grpc.server_names[0]",
            ),
            (
                "bad public url",
                "[http]\npublic_url = \"ftp://x\"",
                "http.public_url",
            ),
            (
                "tiny message limit",
                "[grpc]\nmax_message_bytes = 10",
                "grpc.max_message_bytes",
            ),
            (
                "workload CRL over the clients' limit",
                "[workload_api]\ncrl_max_bytes = 5000000",
                "workload_api.crl_max_bytes",
            ),
            (
                "bad CRL push interval",
                "[workload_api]\ncrl_push_interval = \"soon\"",
                "workload_api.crl_push_interval",
            ),
            (
                "CRL push interval too long",
                "[workload_api]\ncrl_push_interval = \"1h\"",
                "workload_api.crl_push_interval",
            ),
            ("bad log filter", "[log]\nlevel = \"=[\"", "log.level"),
            (
                "template with invalid spiffe id",
                "[[mapping]]\nattestor = \"unix\"\nspiffe_id = \"spiffe://example.org//x/{claims.uid}\"",
                "mapping[0].spiffe_id",
            ),
            (
                "template in another trust domain",
                "[[mapping]]\nattestor = \"unix\"\nspiffe_id = \"spiffe://other.org/{claims.uid}\"",
                "mapping[0].spiffe_id",
            ),
            (
                "unknown placeholder",
                "[[mapping]]\nattestor = \"unix\"\nspiffe_id = \"spiffe://example.org/{uid}\"",
                "mapping[0].spiffe_id",
            ),
            (
                "unknown attestor",
                "[[mapping]]\nattestor = \"magic\"\nspiffe_id = \"spiffe://example.org/x\"",
                "mapping[0].attestor",
            ),
            (
                "bad match value",
                "[[mapping]]\nattestor = \"unix\"\nspiffe_id = \"spiffe://example.org/x\"\nmatch = { uid = { a = 1 } }",
                "mapping[0].match.uid",
            ),
        ];
        for (what, extra, key) in rows {
            let got = problems(&format!("{MINIMAL}\n{extra}"));
            assert!(
                got.iter().any(|(k, _)| k == key),
                "{what}: expected a problem at {key}, got {got:?}"
            );
        }
        let missing = problems("");
        assert_eq!(missing.len(), 2, "{missing:?}");
    }

    #[test]
    fn oidc_issuers_are_validated() {
        let good = format!(
            "{MINIMAL}\n[[oidc]]\nissuer = \"https://token.actions.githubusercontent.com\"\njwks_url = \"https://token.actions.githubusercontent.com/.well-known/jwks\"\naudiences = [\"https://ephemera.example.org\"]\nrequired_claims = {{ repository_owner = \"acme\" }}\n"
        );
        let c = Config::from_toml(&good, Path::new("/")).unwrap();
        assert_eq!(c.oidc.len(), 1);
        assert_eq!(c.oidc[0].algorithms, [Alg::Rs256, Alg::Es256]);
        assert_eq!(c.oidc[0].clock_skew, Duration::from_secs(30));
        let rows: &[(&str, &str)] = &[
            (
                "issuer = \"https://i\"\naudiences = [\"a\"]",
                "oidc[0].jwks_url",
            ),
            (
                "issuer = \"https://i\"\njwks_file = \"j\"",
                "oidc[0].audiences",
            ),
            (
                "issuer = \"https://i\"\njwks_file = \"j\"\naudiences = [\"a\"]\nalgorithms = [\"HS256\"]",
                "oidc[0].algorithms[0]",
            ),
            (
                "issuer = \"https://i\"\njwks_file = \"j\"\naudiences = [\"a\"]\nalgorithms = [\"none\"]",
                "oidc[0].algorithms[0]",
            ),
            (
                "issuer = \"https://i\"\njwks_url = \"http://example.com/k\"\naudiences = [\"a\"]",
                "oidc[0].jwks_url",
            ),
            ("jwks_file = \"j\"\naudiences = [\"a\"]", "oidc[0].issuer"),
            (
                "issuer = \"https://i\"\njwks_file = \"j\"\naudiences = [\"a\"]\nclock_skew = \"1h\"",
                "oidc[0].clock_skew",
            ),
        ];
        for (body, key) in rows {
            let got = problems(&format!("{MINIMAL}\n[[oidc]]\n{body}\n"));
            assert!(got.iter().any(|(k, _)| k == key), "{key}: {got:?}");
        }
    }

    #[test]
    fn relative_paths_resolve_against_the_config_directory() {
        let c = Config::from_toml(
            "trust_domain = \"example.org\"\ndata_dir = \"state\"\n[grpc]\nsocket = \"run/b.sock\"",
            Path::new("/etc/ephemera"),
        )
        .unwrap();
        assert_eq!(c.data_dir, Path::new("/etc/ephemera/state"));
        assert_eq!(c.grpc.socket, Path::new("/etc/ephemera/run/b.sock"));
    }

    #[test]
    fn type_errors_name_the_key() {
        let err = Config::from_toml(
            "trust_domain = \"example.org\"\ndata_dir = \"/d\"\n[grpc]\ninsecure_plaintext = \"yes\"",
            Path::new("/"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("insecure_plaintext"), "{err}");
    }
}
