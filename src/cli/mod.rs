//! The `ephemera` command line: server commands (`serve`, `dev`, `ca init`, `config check`) and
//! client commands (`token`, `svid`).
//!
//! Exit status: 0 success; 2 bad command line; 64 bad configuration or input; 69 broker
//! unreachable or unavailable; 77 unauthenticated or denied; 1 anything else.

mod admin;
mod policy;
mod server;
mod svid;
mod token;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::client::{ClientError, ConnectOptions};

/// Bad configuration or input (`EX_USAGE`).
pub const EXIT_USAGE: u8 = 64;
/// Broker unreachable or unavailable (`EX_UNAVAILABLE`).
pub const EXIT_UNAVAILABLE: u8 = 69;
/// Unauthenticated or denied (`EX_NOPERM`).
pub const EXIT_DENIED: u8 = 77;

/// A command failure with the exit status it maps to.
#[derive(Debug)]
pub struct Failure {
    /// Process exit status.
    pub code: u8,
    /// What went wrong, with context.
    pub error: anyhow::Error,
}

impl Failure {
    /// A failure with exit status `code`.
    pub fn new(code: u8, error: impl Into<anyhow::Error>) -> Self {
        Self {
            code,
            error: error.into(),
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Self { code: 1, error }
    }
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        let code = match e {
            ClientError::BadAddress(_) | ClientError::CaFile { .. } => EXIT_USAGE,
            ClientError::NotFound(_) | ClientError::Unreachable { .. } => EXIT_UNAVAILABLE,
        };
        Self::new(code, e)
    }
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        use tonic::Code;
        let (code, what) = match s.code() {
            Code::Unauthenticated => (EXIT_DENIED, "not authenticated"),
            Code::PermissionDenied => (EXIT_DENIED, "denied"),
            Code::InvalidArgument | Code::ResourceExhausted | Code::OutOfRange => {
                (EXIT_USAGE, "rejected")
            }
            Code::Unavailable | Code::DeadlineExceeded => (EXIT_UNAVAILABLE, "unavailable"),
            _ => (1, "failed"),
        };
        Self::new(
            code,
            anyhow::anyhow!("broker {what} ({:?}): {}", s.code(), s.message()),
        )
    }
}

/// Ephemera: short-lived SPIFFE credentials bound to the task they were issued for.
#[derive(Debug, Parser)]
#[command(name = "ephemera", version, about, long_about = None)]
pub struct Cli {
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Every `ephemera` command.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the broker from a config file.
    Serve {
        /// Path to the TOML config (see deploy/ephemera.example.toml).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run a local broker with embedded defaults: keys created on first run, loopback only.
    Dev(server::DevArgs),
    /// Manage the certificate authority.
    Ca {
        /// The CA command.
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Validate configuration.
    Config {
        /// The config command.
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Operator commands against a running broker (needs the admin token).
    Admin {
        /// The admin command.
        #[command(subcommand)]
        command: admin::AdminCommand,
    },
    /// Check and explain Cedar policies.
    Policy {
        /// The policy command.
        #[command(subcommand)]
        command: policy::PolicyCommand,
    },
    /// Mint a JWT-SVID and print it.
    Token(token::TokenArgs),
    /// Mint an X.509-SVID from a locally generated key and write it to a directory.
    Svid(svid::SvidArgs),
}

/// `ephemera ca ...`
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a root CA, an intermediate CA and a JWT signing key in a data directory.
    Init(server::CaInitArgs),
}

/// `ephemera config ...`
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Parse and validate a config file, reporting every problem.
    Check {
        /// Path to the TOML config.
        #[arg(long, short)]
        config: PathBuf,
    },
}

/// How client commands find and trust the broker.
#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    /// Broker Unix socket (takes precedence over --addr).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Broker address: unix:///path, https://host:port or host:port.
    #[arg(long, env = "EPHEMERA_ADDR")]
    pub addr: Option<String>,
    /// Data directory of a local broker, for endpoints.json and bundle.pem.
    #[arg(long, env = "EPHEMERA_DATA_DIR", default_value = ".ephemera")]
    pub data_dir: PathBuf,
    /// PEM trust anchors for the broker's TLS certificate.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
}

/// Evidence a client command presents besides its Unix socket peer credentials.
#[derive(Debug, Clone, Args)]
pub struct EvidenceArgs {
    /// A single-use join token from `ephemera admin join-token create`.
    #[arg(long, env = "EPHEMERA_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
    /// A file holding an OIDC/JWT token to present as evidence (e.g. a Kubernetes projected
    /// service-account token).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

impl EvidenceArgs {
    /// Wraps `msg` in a request carrying this evidence.
    pub fn request<T>(&self, msg: T) -> Result<tonic::Request<T>, Failure> {
        let mut req = tonic::Request::new(msg);
        let invalid =
            |what: &str| Failure::new(EXIT_USAGE, anyhow::anyhow!("{what} is not valid text"));
        if let Some(t) = &self.join_token {
            let v = t.trim().parse().map_err(|_| invalid("--join-token"))?;
            req.metadata_mut()
                .insert(crate::attest::join_token::METADATA_KEY, v);
        }
        if let Some(path) = &self.token_file {
            let token = std::fs::read_to_string(path).map_err(|e| {
                Failure::new(
                    EXIT_USAGE,
                    anyhow::anyhow!("--token-file {}: {e}", path.display()),
                )
            })?;
            let v = format!("Bearer {}", token.trim())
                .parse()
                .map_err(|_| invalid("--token-file"))?;
            req.metadata_mut().insert("authorization", v);
        }
        Ok(req)
    }
}

impl ConnectArgs {
    fn options(&self) -> ConnectOptions {
        ConnectOptions {
            socket: self.socket.clone(),
            addr: self.addr.clone(),
            data_dir: self.data_dir.clone(),
            ca_file: self.ca_file.clone(),
        }
    }
}

/// Parses a `--ttl` value into seconds.
fn ttl_secs(ttl: Option<&str>) -> Result<Option<u64>, Failure> {
    ttl.map(|t| {
        crate::config::parse_duration(t)
            .map(|d| d.as_secs())
            .map_err(|e| Failure::new(EXIT_USAGE, anyhow::anyhow!("--ttl: {e}")))
    })
    .transpose()
}

/// Formats Unix seconds as RFC 3339.
fn rfc3339(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| secs.to_string())
}

/// Runs one command.
pub async fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Serve { config } => server::serve(&config).await,
        Command::Dev(args) => server::dev(args).await,
        Command::Ca {
            command: CaCommand::Init(args),
        } => server::ca_init(&args),
        Command::Config {
            command: ConfigCommand::Check { config },
        } => server::config_check(&config),
        Command::Admin { command } => admin::run(command).await,
        Command::Policy { command } => policy::run(command),
        Command::Token(args) => token::run(args).await,
        Command::Svid(args) => svid::run(args).await,
    }
}
