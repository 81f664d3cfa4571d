//! The `ephemera` command line: server commands (`serve`, `dev`, `ca init`, `config check`) and
//! client commands (`token`, `svid`).
//!
//! Exit status: 0 success; 2 bad command line; 64 bad configuration or input; 69 broker
//! unreachable or unavailable; 77 unauthenticated or denied; 1 anything else.

mod admin;
mod ca;
mod policy;
mod run;
mod server;
mod svid;
mod token;

use std::path::PathBuf;

use std::io::Write as _;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use crate::client::evidence::{self, Evidence, EvidenceError, EvidenceOptions};
use crate::client::{ClientError, ConnectOptions};
use crate::secret::Secret;

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

impl Failure {
    /// Whether this is a write to a closed pipe (the reader of stdout went away).
    pub fn is_closed_pipe(&self) -> bool {
        self.error.chain().any(|c| {
            c.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
        })
    }

    /// The message printed for this failure: the error and its causes, each said once (an
    /// error whose message already includes its cause's text does not repeat it), never empty.
    pub fn message(&self) -> String {
        let mut text = String::new();
        for cause in self.error.chain() {
            let part = cause.to_string();
            let part = part.trim();
            if part.is_empty() || text.contains(part) {
                continue;
            }
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(part);
        }
        if text.is_empty() {
            "failed without a message".to_owned()
        } else {
            text
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
            ClientError::Tls { .. } => EXIT_USAGE,
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
        let message = match (s.code(), s.message().trim()) {
            // A server that does not serve the service: most often the workload socket asked
            // for a broker call.
            (Code::Unimplemented, _) => "this address does not serve the Ephemera broker API \
                 (the Workload API socket serves only the SPIFFE Workload API and SDS); use the \
                 broker socket (`--socket`, `broker_socket` in endpoints.json) or the TLS address"
                .to_owned(),
            (_, m) if m.contains("h2 protocol error") || m.contains("frame with invalid size") => {
                format!(
                    "{m}: the peer does not speak plaintext HTTP/2 here; if it is a broker's \
                     TLS port, use https://HOST:PORT (and --ca-file with its bundle.pem)"
                )
            }
            (_, "") => format!("no message from the server ({:?})", s.code()),
            (_, m) => m.to_owned(),
        };
        Self::new(
            code,
            anyhow::anyhow!("broker {what} ({:?}): {message}", s.code()),
        )
    }
}

/// Ephemera: short-lived SPIFFE credentials bound to the task they were issued for.
#[derive(Debug, Parser)]
#[command(name = "ephemera", version = VERSION, about, long_about = None)]
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
    /// Run a command inside a task with credentials that are revoked when it exits.
    Run(run::RunArgs),
    /// Print a shell completion script: `ephemera completions bash > /etc/bash_completion.d/ephemera`
    /// (also zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// `ephemera ca ...`
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a root CA, an intermediate CA and a JWT signing key in a data directory.
    Init(server::CaInitArgs),
    /// Show every signing key and trust anchor: state, validity, schedule, live credentials.
    Status(ca::StatusArgs),
    /// Rotate the intermediate, the JWT key or (root online) the root now.
    Rotate(ca::RotateArgs),
    /// Revoke a compromised signing key and everything live it signed.
    RevokeKey(ca::RevokeKeyArgs),
    /// Print the CSR of the intermediate waiting for the offline root.
    Csr(ca::CsrArgs),
    /// Sign an intermediate's CSR with the root (run on the root's machine).
    SignIntermediate(ca::SignArgs),
    /// Make a new root for a rollover (run on the root's machine), to stage.
    NewRoot(ca::NewRootArgs),
    /// Stage an intermediate the offline root signed, or a new root.
    Stage(ca::StageArgs),
    /// Write a new admin token; the previous one stays accepted until `--finish`. Running
    /// brokers pick the change up on their next admin call, no restart needed.
    RotateAdminToken {
        /// The data directory holding admin.token (replicas share it).
        #[arg(long, env = "EPHEMERA_DATA_DIR", default_value = ".ephemera")]
        data_dir: PathBuf,
        /// The admin token file, if not `<data-dir>/admin.token`.
        #[arg(long)]
        admin_token_file: Option<PathBuf>,
        /// End the overlap: drop the previous token (run once every client has the new one).
        #[arg(long)]
        finish: bool,
    },
}

/// `ephemera config ...`
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Check a config file as `serve` would before it binds (the file, the CA in the data
    /// directory and its trust domain, policies, the admin token's mode, socket directories),
    /// reporting every problem.
    Check {
        /// Path to the TOML config.
        #[arg(long, short)]
        config: PathBuf,
        /// Also open the store as `serve` would (on PostgreSQL this applies pending migrations).
        #[arg(long)]
        connect: bool,
        /// Print JSON: {"config", "ok", "trust_domain", "mapping_rules", "problems": [...]}.
        #[arg(long)]
        json: bool,
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

/// Evidence a client command presents besides its Unix socket peer credentials; see
/// [`crate::client::evidence`] for the order in which sources are tried.
#[derive(Debug, Clone, Args)]
pub struct EvidenceArgs {
    /// A single-use join token from `ephemera admin join-token create`.
    #[arg(long, env = "EPHEMERA_JOIN_TOKEN", hide_env_values = true)]
    pub join_token: Option<String>,
    /// A file holding an OIDC/JWT token to present as evidence.
    #[arg(long, env = "EPHEMERA_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// The variable holding a GitLab `id_tokens` token (default in GitLab CI: EPHEMERA_ID_TOKEN).
    #[arg(long, env = "EPHEMERA_GITLAB_ID_TOKEN", value_name = "VAR")]
    pub gitlab_id_token: Option<String>,
    /// Audience of the ID token requested from GitHub Actions.
    #[arg(long, env = "EPHEMERA_OIDC_AUDIENCE", default_value = evidence::DEFAULT_OIDC_AUDIENCE)]
    pub oidc_audience: String,
    /// The projected Kubernetes service-account token, used when it exists.
    #[arg(long, env = "EPHEMERA_K8S_TOKEN_FILE", default_value = evidence::DEFAULT_K8S_TOKEN_FILE)]
    pub k8s_token_file: PathBuf,
    /// Do not look for GitHub Actions, GitLab CI or Kubernetes evidence in the environment.
    #[arg(long)]
    pub no_ambient: bool,
}

impl EvidenceArgs {
    /// The evidence options these flags describe.
    pub fn options(&self) -> EvidenceOptions {
        EvidenceOptions {
            join_token: self.join_token.clone().map(Secret::new),
            token_file: self.token_file.clone(),
            gitlab_id_token_var: self.gitlab_id_token.clone(),
            oidc_audience: self.oidc_audience.clone(),
            k8s_token_file: self.k8s_token_file.clone(),
            ambient: !self.no_ambient,
        }
    }

    /// Gathers the evidence.
    pub async fn resolve(&self) -> Result<Evidence, Failure> {
        self.options().resolve().await.map_err(Failure::from)
    }
}

impl From<EvidenceError> for Failure {
    fn from(e: EvidenceError) -> Self {
        let code = match e {
            EvidenceError::Invalid(_) => EXIT_USAGE,
            EvidenceError::Unavailable(_) => EXIT_UNAVAILABLE,
        };
        Self::new(code, e)
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

/// `ephemera --version`: the release, the commit it was built from and the build date.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("EPHEMERA_COMMIT"),
    ", built ",
    env!("EPHEMERA_BUILD_DATE"),
    ")"
);

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

/// Runs one command; returns the exit status.
pub async fn run(cli: Cli) -> Result<u8, Failure> {
    if let Command::Run(args) = cli.command {
        return run::run(args).await;
    }
    match cli.command {
        Command::Run(_) => Ok(()),
        Command::Serve { config } => server::serve(&config).await,
        Command::Dev(args) => server::dev(args).await,
        Command::Ca {
            command: CaCommand::Init(args),
        } => server::ca_init(&args),
        Command::Ca {
            command: CaCommand::Status(args),
        } => ca::status(args).await,
        Command::Ca {
            command: CaCommand::Rotate(args),
        } => ca::rotate(args).await,
        Command::Ca {
            command: CaCommand::RevokeKey(args),
        } => ca::revoke_key(args).await,
        Command::Ca {
            command: CaCommand::Csr(args),
        } => ca::csr(args).await,
        Command::Ca {
            command: CaCommand::SignIntermediate(args),
        } => ca::sign_intermediate(&args),
        Command::Ca {
            command: CaCommand::NewRoot(args),
        } => ca::new_root(&args),
        Command::Ca {
            command: CaCommand::Stage(args),
        } => ca::stage(args).await,
        Command::Ca {
            command:
                CaCommand::RotateAdminToken {
                    data_dir,
                    admin_token_file,
                    finish,
                },
        } => {
            let path = admin_token_file
                .unwrap_or_else(|| crate::datadir::DataDir::new(&data_dir).admin_token());
            let mut out = std::io::stdout().lock();
            if finish {
                let dropped = crate::api::admin::finish_token_rotation(&path)
                    .map_err(|e| Failure::new(EXIT_USAGE, e))?;
                writeln!(
                    out,
                    "{}: {}",
                    path.display(),
                    if dropped {
                        "previous admin token dropped; only the current one is accepted"
                    } else {
                        "holds one token; nothing to drop"
                    }
                )
            } else {
                crate::api::admin::rotate_token_file(&path, true)
                    .map_err(|e| Failure::new(EXIT_USAGE, e))?;
                writeln!(
                    out,
                    "{}: new admin token written (first line); the previous one is accepted \
                     until `ephemera ca rotate-admin-token --finish`",
                    path.display()
                )
            }
            .context("writing to stdout")?;
            Ok(())
        }
        Command::Config {
            command:
                ConfigCommand::Check {
                    config,
                    connect,
                    json,
                },
        } => server::config_check(&config, connect, json).await,
        Command::Admin { command } => admin::run(command).await,
        Command::Policy { command } => policy::run(command),
        Command::Token(args) => token::run(args).await,
        Command::Svid(args) => svid::run(args).await,
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd, "ephemera", &mut script);
            std::io::Write::write_all(&mut std::io::stdout().lock(), &script)
                .context("writing to stdout")?;
            Ok(())
        }
    }
    .map(|()| 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cause_is_said_once_and_never_empty() {
        let io = std::io::Error::from_raw_os_error(2);
        let shown = io.to_string();
        let err = anyhow::Error::new(io).context(format!("reading /x: {shown}"));
        let m = Failure::new(1, err).message();
        assert_eq!(m, format!("reading /x: {shown}"));
        assert_eq!(m.matches("os error 2").count(), 1, "{m}");
        let err = anyhow::Error::new(std::io::Error::from_raw_os_error(13)).context("opening /y");
        assert_eq!(
            Failure::new(1, err).message(),
            format!("opening /y: {}", std::io::Error::from_raw_os_error(13))
        );
        assert_eq!(
            Failure::new(1, anyhow::anyhow!("")).message(),
            "failed without a message"
        );
    }
}
