//! Wires a broker from a validated [`Config`] and serves it: gRPC on TCP (TLS) and on a Unix
//! socket, HTTP on TCP, until shutdown.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinHandle;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::transport::Server;

use crate::api::admin::{AdminAuth, AdminService};
use crate::api::authority::Normalized;
use crate::api::broker::BrokerService;
use crate::api::conn::{ConnectionBounds, Guarded};
use crate::api::health::{BROKER_SERVICES, HealthWorker, WORKLOAD_SERVICES, reflection};
use crate::api::pb::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryServiceServer;
use crate::api::pb::v1::admin_server::AdminServer;
use crate::api::pb::v1::broker_server::BrokerServer;
use crate::api::pb::v1::revocations_server::RevocationsServer;
use crate::api::pb::workload::spiffe_workload_api_server::SpiffeWorkloadApiServer;
use crate::api::revocations::RevocationsService;
use crate::api::sds::SdsService;
use crate::api::workload::WorkloadService;
use crate::attest::Attestors;
use crate::attest::join_token::JoinTokenAttestor;
use crate::attest::jwks::JwksCache;
use crate::attest::oidc::{OidcAttestor, OidcIssuer};
use crate::attest::unix::UnixAttestor;
use crate::attest::x509pop::{ClientCas, X509PopAttestor};
use crate::broker::reload::{MappingLoader, Reloader};
use crate::broker::trust::LockKeeper;
use crate::broker::workload::WorkloadStreams;
use crate::broker::{Broker, BrokerParts, Limits};
use crate::ca::{CaError, keys};
use crate::clock::Clock;
use crate::config::{Config, ServerName, StoreConfig};
use crate::endpoints::Endpoints;
use crate::id::SpiffeId;
use crate::lease::Reaper;
use crate::lease::RevocationBus;
use crate::lease::crl::CrlSource;
use crate::lease::feed::RevocationFeed;
use crate::lease::keys::KeyRing;
use crate::policy::cedar::PolicyProblem;
use crate::policy::{Mapper, PolicyEngine};
use crate::shutdown::Shutdown;
use crate::store::Store;
use crate::store::postgres::PostgresStore;
use crate::store::sqlite::SqliteStore;

/// Largest HTTP/2 header list accepted: above the 16 KiB token limit, so an oversized token
/// gets the attestor's `ResourceExhausted` naming the limit rather than a bare HTTP 431.
pub const MAX_HEADER_LIST_BYTES: u32 = 64 * 1024;

/// How long shutdown waits for servers to finish before aborting them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Lifetime of the broker's own TLS serving certificate (capped by the CA's expiry).
pub const SERVING_CERT_TTL: Duration = Duration::from_secs(90 * 86_400);

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The CA could not be loaded (missing, wrong modes, wrong trust domain...).
    #[error(transparent)]
    Ca(#[from] CaError),
    /// A listener could not be bound.
    #[error("cannot listen on {what} {addr}: {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// Its address or path.
        addr: String,
        /// The I/O error.
        source: io::Error,
    },
    /// The policies do not parse or validate.
    #[error("policies in {} are invalid:\n{}", dir.display(), problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Policy {
        /// The policy directory.
        dir: PathBuf,
        /// Every problem, by file and line.
        problems: Vec<PolicyProblem>,
    },
    /// The x509pop client CA bundles could not be loaded.
    #[error("x509pop.ca_bundles: {0}")]
    ClientCa(String),
    /// Another broker is already serving on the socket.
    #[error("another broker is already serving on {}", .0.display())]
    SocketInUse(PathBuf),
    /// TLS or server setup failed.
    #[error("server setup failed: {0}")]
    Setup(String),
    /// The signing keys could not be brought into the store or used.
    #[error("signing keys: {0}")]
    Keys(crate::lease::keys::KeyError),
}

impl StartError {
    /// Whether this is the operator's configuration (exit 64) rather than a runtime failure.
    pub fn is_config(&self) -> bool {
        matches!(self, Self::Policy { .. } | Self::ClientCa(_))
            || matches!(
                self,
                Self::Ca(
                    CaError::KeyFileMode { .. }
                        | CaError::NotInitialized { .. }
                        | CaError::TrustDomainMismatch { .. }
                        | CaError::Invalid { .. }
                )
            )
    }
}

/// A running broker.
pub struct Running {
    /// Where it can be reached.
    pub endpoints: Endpoints,
    /// The broker core, for in-process callers.
    pub broker: Arc<Broker>,
    shutdown: Shutdown,
    /// The servers.
    tasks: Vec<JoinHandle<Result<(), String>>>,
    /// The background workers (reaper, CRL publisher, reloader, revocation feed).
    workers: Vec<JoinHandle<()>>,
    /// The SQLite store, whose checkpointer worker stops last.
    sqlite: Option<SqliteStore>,
    data_dir: PathBuf,
}

impl Running {
    /// Stops every listener gracefully (streams are told to end; anything still running after
    /// [`SHUTDOWN_GRACE`] is aborted) and removes the socket and `endpoints.json`.
    pub async fn shutdown(self) -> Result<(), String> {
        self.shutdown.trigger();
        let mut first_err = None;
        for mut t in self.tasks {
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut t).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => {
                    first_err.get_or_insert(e);
                }
                Ok(Err(e)) => {
                    first_err.get_or_insert(e.to_string());
                }
                Err(_) => {
                    t.abort();
                    tracing::warn!("a server did not stop within the shutdown grace; aborted");
                }
            }
        }
        let mut workers = self.workers;
        // The checkpointer stops after everything that writes.
        workers.extend(
            self.sqlite
                .as_ref()
                .and_then(SqliteStore::stop_checkpointer),
        );
        for mut w in workers {
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut w).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_err.get_or_insert(format!("a background worker failed: {e}"));
                }
                Err(_) => {
                    w.abort();
                    tracing::warn!(
                        "a background worker did not stop within the shutdown grace; aborted"
                    );
                }
            }
        }
        let _ = std::fs::remove_file(&self.endpoints.broker_socket);
        if let Some(w) = &self.endpoints.workload_socket {
            let _ = std::fs::remove_file(w);
        }
        if Endpoints::read(&self.data_dir).is_ok_and(|e| e == self.endpoints) {
            let _ = std::fs::remove_file(self.data_dir.join(crate::endpoints::FILE));
        }
        first_err.map_or(Ok(()), Err)
    }
}

async fn bind_tcp(what: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind {
            what,
            addr: addr.to_string(),
            source,
        })
}

/// Re-reads the config file and swaps in its identity-mapping rules if the whole file is
/// valid; otherwise logs every problem and keeps the current rules. Other settings take effect
/// on restart.
pub fn reload_mappings(broker: &Broker, path: &Path) -> Result<usize, String> {
    match Config::load(path) {
        Ok(c) if c.trust_domain == *broker.trust_domain() => {
            let n = c.mappings.len();
            broker.set_mapper(Mapper::new(c.trust_domain, c.mappings));
            tracing::info!(config = %path.display(), rules = n, "identity mapping reloaded");
            Ok(n)
        }
        Ok(_) => {
            let e = "trust_domain changed: restart the broker to change it".to_owned();
            tracing::error!(config = %path.display(), error = %e, "mapping reload refused");
            Err(e)
        }
        Err(e) => {
            tracing::error!(config = %path.display(), error = %e, "mapping reload refused; previous rules keep serving");
            Err(e.to_string())
        }
    }
}

/// The connections of a Unix listener, each with its request `:authority` normalized so every
/// gRPC stack can call (see [`crate::api::authority`]).
fn unix_incoming(
    listener: UnixListener,
    bounds: ConnectionBounds,
) -> impl tokio_stream::Stream<Item = io::Result<Guarded<Normalized<tokio::net::UnixStream>>>> {
    UnixListenerStream::new(listener)
        .map(move |c| c.map(|c| Guarded::new(Normalized::new(c), bounds)))
}

/// Binds the Unix socket, replacing a stale socket file but never a live broker's.
async fn bind_socket(path: &Path) -> Result<UnixListener, StartError> {
    let bind_err = |source| StartError::Bind {
        what: "unix socket",
        addr: path.display().to_string(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(bind_err)?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(StartError::SocketInUse(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(bind_err)?;
    }
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    // Any local process may connect: who it is gets decided by attestation, not file modes.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(bind_err)?;
    Ok(listener)
}

/// What the broker's serving certificate names: its SPIFFE ID and `grpc.server_names`.
struct ServingNames {
    broker_id: SpiffeId,
    dns: Vec<String>,
    ips: Vec<IpAddr>,
}

/// A serving certificate from the active intermediate: its chain, key, the intermediate's id
/// and how long it is valid.
struct Serving {
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
    intermediate: String,
    life: Duration,
}

impl ServingNames {
    fn new(config: &Config) -> Result<Self, StartError> {
        let names = &config.grpc.server_names;
        let dns = names
            .iter()
            .filter_map(|n| match n {
                ServerName::Dns(d) => Some(d.clone()),
                ServerName::Ip(_) => None,
            })
            .collect();
        let ips = names
            .iter()
            .filter_map(|n| match n {
                ServerName::Ip(ip) => Some(*ip),
                ServerName::Dns(_) => None,
            })
            .collect();
        let broker_id = SpiffeId::parse_in(
            &format!("{}/ephemera/broker", config.trust_domain.id_uri()),
            &config.trust_domain,
        )
        .map_err(|e| StartError::Setup(e.to_string()))?;
        Ok(Self {
            broker_id,
            dns,
            ips,
        })
    }

    /// A serving certificate from the active intermediate of `ca`, valid for
    /// [`SERVING_CERT_TTL`] (less when the intermediate ends sooner).
    fn issue(&self, ca: &KeyRing, clock: &dyn Clock) -> Result<Serving, String> {
        let keys = ca.keys();
        let (id, minter) = keys.x509().map_err(|e| {
            if keys.problems.is_empty() {
                e.to_string()
            } else {
                keys.problems.join("; ")
            }
        })?;
        let now = clock.now();
        let serving = minter
            .serving_identity(&self.broker_id, &self.dns, &self.ips, now, SERVING_CERT_TTL)
            .map_err(|e| e.to_string())?;
        let life = minter
            .ca_not_after()
            .min(now + SERVING_CERT_TTL)
            .duration_since(now)
            .unwrap_or_default();
        Ok(Serving {
            chain: serving.chain.into_iter().map(Into::into).collect(),
            key: rustls::pki_types::PrivateKeyDer::Pkcs8(serving.key.into_inner().into()),
            intermediate: id.to_owned(),
            life,
        })
    }
}

/// Keeps the TLS listener's serving certificate fresh without a restart: a new one at half the
/// current one's life, and at once when the active intermediate changes (a rotation, a revoked
/// intermediate), so the listener never serves a certificate that has ended or chains to a
/// withdrawn key.
struct ServingCertKeeper {
    names: ServingNames,
    ca: Arc<KeyRing>,
    clock: Arc<dyn Clock>,
    cert: Arc<crate::api::tls::ServingCert>,
}

/// How long to wait before trying again when a serving certificate cannot be made.
const SERVING_RETRY: Duration = Duration::from_secs(30);

impl ServingCertKeeper {
    fn start(
        self,
        first: &Serving,
        mut shutdown: crate::shutdown::ShutdownSignal,
    ) -> JoinHandle<()> {
        let mut intermediate = first.intermediate.clone();
        let mut renew = tokio::time::Instant::now() + first.life / 2;
        tokio::spawn(async move {
            let mut keys = self.ca.subscribe();
            loop {
                tokio::select! {
                    () = shutdown.wait() => return,
                    () = tokio::time::sleep_until(renew) => {}
                    changed = keys.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        let active = keys.borrow_and_update().x509().ok().map(|(id, _)| id.to_owned());
                        if active.is_none_or(|id| id == intermediate) {
                            continue;
                        }
                    }
                }
                let issued = self
                    .names
                    .issue(&self.ca, self.clock.as_ref())
                    .and_then(|s| {
                        self.cert
                            .set(s.chain.clone(), &s.key)
                            .map(|()| s)
                            .map_err(|e| e.to_string())
                    });
                match issued {
                    Ok(s) => {
                        tracing::info!(
                            intermediate = %s.intermediate,
                            valid_seconds = s.life.as_secs(),
                            "new TLS serving certificate"
                        );
                        intermediate = s.intermediate;
                        renew =
                            tokio::time::Instant::now() + (s.life / 2).max(Duration::from_secs(1));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot renew the TLS serving certificate; retrying");
                        renew = tokio::time::Instant::now() + SERVING_RETRY;
                    }
                }
            }
        })
    }
}

/// The TLS configuration of the gRPC TCP listener: a serving certificate from our own CA for
/// `grpc.server_names` (kept fresh by a [`ServingCertKeeper`] in `workers`), and client
/// certificates requested when `x509pop` is configured.
fn tls_config(
    config: &Config,
    ca: &Arc<KeyRing>,
    clock: &Arc<dyn Clock>,
    client_ca_subjects: Option<Vec<Vec<u8>>>,
    shutdown: &Shutdown,
    workers: &mut Vec<JoinHandle<()>>,
) -> Result<rustls::ServerConfig, StartError> {
    let names = ServingNames::new(config)?;
    let first = names
        .issue(ca, clock.as_ref())
        .map_err(|e| StartError::Setup(format!("serving certificate: {e}")))?;
    let cert = Arc::new(
        crate::api::tls::ServingCert::new(first.chain.clone(), &first.key)
            .map_err(|e| StartError::Setup(format!("tls: {e}")))?,
    );
    let tls = crate::api::tls::server_config(
        cert.clone(),
        client_ca_subjects.map(|s| s.into_iter().map(Into::into).collect()),
    )
    .map_err(|e| StartError::Setup(format!("tls: {e}")))?;
    workers.push(
        ServingCertKeeper {
            names,
            ca: ca.clone(),
            clock: clock.clone(),
            cert,
        }
        .start(&first, shutdown.signal()),
    );
    Ok(tls)
}

/// The configured attestors, most explicit evidence first: a join token, a bearer token, a
/// client certificate, then the Unix peer.
fn attestors(
    config: &Config,
    clock: Arc<dyn Clock>,
    client_cas: Option<ClientCas>,
    store: Arc<dyn Store>,
) -> Attestors {
    let mut list: Vec<Box<dyn crate::attest::Attestor>> =
        vec![Box::new(JoinTokenAttestor::new(store, clock.clone()))];
    if !config.oidc.is_empty() {
        let issuers = config
            .oidc
            .iter()
            .map(|o| OidcIssuer {
                issuer: o.issuer.clone(),
                audiences: o.audiences.clone(),
                algorithms: o.algorithms.clone(),
                max_token_age: o.max_token_age,
                max_token_lifetime: o.max_token_lifetime,
                clock_skew: o.clock_skew,
                required_claims: o.required_claims.clone(),
                jwks: JwksCache::new(o.jwks.clone(), o.jwks_refetch_interval),
            })
            .collect();
        list.push(Box::new(OidcAttestor::new(issuers, clock.clone())));
    }
    if let Some(cas) = client_cas {
        list.push(Box::new(X509PopAttestor::new(cas, clock)));
    }
    list.push(Box::new(UnixAttestor::new()));
    Attestors::new(list)
}

/// Starts a broker from `config`; the CA must already exist in the data directory.
pub async fn start(config: Config, clock: Arc<dyn Clock>) -> Result<Running, StartError> {
    // Install the metrics recorder before anything records.
    let _ = crate::telemetry::handle();
    let grpc_tcp = bind_tcp("grpc", config.grpc.listen).await?;
    let http_tcp = bind_tcp("http", config.http.listen).await?;
    let grpc_addr = grpc_tcp
        .local_addr()
        .map_err(|e| StartError::Setup(e.to_string()))?;
    let http_addr = http_tcp
        .local_addr()
        .map_err(|e| StartError::Setup(e.to_string()))?;
    let public_url = config
        .http
        .public_url
        .clone()
        .unwrap_or_else(|| format!("http://{http_addr}"));

    let client_cas = if config.x509pop_ca_bundles.is_empty() {
        None
    } else {
        Some(ClientCas::load(&config.x509pop_ca_bundles).map_err(StartError::ClientCa)?)
    };
    // Client certificates are requested when someone may present one: x509pop workloads, or
    // admins with an SVID of this broker's CA.
    let mut client_cas_subjects = client_cas.as_ref().map(|c| c.subjects.clone());
    let policy = Arc::new(PolicyEngine::load(&config.policy_dir).map_err(|problems| {
        StartError::Policy {
            dir: config.policy_dir.clone(),
            problems,
        }
    })?);
    let mut sqlite = None;
    let (store, postgres): (Arc<dyn Store>, Option<PostgresStore>) = match &config.store {
        StoreConfig::Sqlite { path } => {
            let s = SqliteStore::open(path)
                .await
                .map_err(|e| StartError::Setup(format!("opening {}: {e}", path.display())))?;
            sqlite = Some(s.clone());
            (Arc::new(s), None)
        }
        StoreConfig::Postgres(pg) => {
            let s = PostgresStore::open(pg)
                .await
                .map_err(|e| StartError::Setup(format!("opening the PostgreSQL store: {e}")))?;
            (Arc::new(s.clone()), Some(s))
        }
    };
    // The CA's keys live in the store (brought in from the data directory the first time).
    crate::ca::keys::load(&config.data_dir, &config.trust_domain)?;
    let ca = Arc::new(
        KeyRing::open(
            crate::lease::keys::CaOptions {
                data_dir: &config.data_dir,
                trust_domain: &config.trust_domain,
                public_url: &public_url,
                jwt_issuer: config.jwt_issuer.clone(),
                settings: config.ca,
            },
            store.clone(),
            clock.clone(),
        )
        .await
        .map_err(StartError::Keys)?,
    );
    if !config.admin_spiffe_ids.is_empty() {
        let own = ClientCas::from_der(&ca.keys().roots).map_err(StartError::ClientCa)?;
        client_cas_subjects
            .get_or_insert_with(Vec::new)
            .extend(own.subjects);
    }
    let admin_auth = Arc::new(AdminAuth::load(
        &config.admin_token_file,
        &crate::datadir::DataDir::new(&config.data_dir).admin_pages_key(),
        config.admin_spiffe_ids.clone(),
        &ca.keys().roots,
        clock.clone(),
    )?);
    // After a restart every live task gets one fresh grace period to reconnect its keep-alive;
    // tasks past their deadline are ended by the reaper's first pass.
    let refreshed = store
        .refresh_active_tasks(clock.unix_now())
        .await
        .map_err(|e| StartError::Setup(format!("store: {e}")))?;
    if refreshed > 0 {
        tracing::info!(
            tasks = refreshed,
            "live tasks given a fresh grace period after restart"
        );
    }
    let bus = RevocationBus::new();
    let shutdown = Shutdown::new();
    let broker = Arc::new(Broker::new(BrokerParts {
        trust_domain: config.trust_domain.clone(),
        attestors: attestors(&config, clock.clone(), client_cas, store.clone()),
        mapper: Mapper::new(config.trust_domain.clone(), config.mappings.clone()),
        policy: policy.clone(),
        ca: ca.clone(),
        store: store.clone(),
        clock: clock.clone(),
        limits: Limits {
            x509: config.x509_svid,
            jwt: config.jwt_svid,
            tasks: config.tasks,
        },
        bus: bus.clone(),
        quotas: config.quotas,
        shutdown: shutdown.signal(),
    }));

    let max_msg = config.grpc.max_message_bytes;
    let setup = |e: tonic_reflection::server::Error| StartError::Setup(e.to_string());
    // Each listener has its own health reporter, listing the services it serves.
    let mut reporters: Vec<(
        tonic_health::server::HealthReporter,
        &'static [&'static str],
    )> = Vec::new();
    let mut broker_routes = || -> Result<tonic::service::Routes, StartError> {
        let (reporter, health) = tonic_health::server::health_reporter();
        reporters.push((reporter, BROKER_SERVICES));
        let (reflection_v1, reflection_v1alpha) = reflection(BROKER_SERVICES).map_err(setup)?;
        let svc = BrokerServer::new(BrokerService::new(broker.clone()))
            .max_decoding_message_size(max_msg);
        let admin = AdminServer::new(AdminService::new(broker.clone(), admin_auth.clone()))
            .max_decoding_message_size(max_msg);
        let revocations = RevocationsServer::new(RevocationsService::new(broker.clone()))
            .max_decoding_message_size(max_msg);
        Ok(tonic::service::Routes::new(health)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(svc)
            .add_service(admin)
            .add_service(revocations))
    };
    let tcp_routes = broker_routes()?;
    let unix_routes = broker_routes()?;
    // The SPIFFE Workload API and Envoy SDS on their own socket, and nothing else.
    let workload_routes = match &config.workload_socket {
        None => None,
        Some(_) => {
            let (reporter, health) = tonic_health::server::health_reporter();
            reporters.push((reporter, WORKLOAD_SERVICES));
            let (reflection_v1, reflection_v1alpha) =
                reflection(WORKLOAD_SERVICES).map_err(setup)?;
            // The Workload API and Envoy's SDS share the streams (and so the CRL they carry).
            let streams = Arc::new(WorkloadStreams::new(broker.clone(), config.workload_api));
            let svc =
                SpiffeWorkloadApiServer::new(WorkloadService::new(broker.clone(), streams.clone()))
                    .max_decoding_message_size(max_msg);
            let sds = SecretDiscoveryServiceServer::new(SdsService::new(broker.clone(), streams))
                .max_decoding_message_size(max_msg);
            Some(
                tonic::service::Routes::new(health)
                    .add_service(reflection_v1)
                    .add_service(reflection_v1alpha)
                    .add_service(svc)
                    .add_service(sds),
            )
        }
    };

    let mut tasks = Vec::new();
    let mut workers = Vec::new();

    // Several brokers on one database: revocations committed by any of them reach this bus.
    if let Some(pg) = postgres {
        workers.push(
            RevocationFeed {
                store: pg,
                bus: broker.bus().clone(),
            }
            .start(shutdown.signal()),
        );
    }
    workers.push(
        Reaper {
            store: store.clone(),
            bus: broker.bus().clone(),
            clock: clock.clone(),
            retention: config.tasks.retention,
        }
        .start(shutdown.signal()),
    );
    broker
        .crl()
        .rebuild(CrlSource::Store)
        .await
        .map_err(|e| StartError::Setup(format!("building the CRL: {e}")))?;
    workers.push(broker.crl().start(broker.bus(), shutdown.signal()));
    // Locks are enforced from the first request.
    broker
        .refresh_locks()
        .await
        .map_err(|e| StartError::Setup(format!("reading locks: {e}")))?;
    workers.push(
        LockKeeper {
            broker: broker.clone(),
        }
        .start(shutdown.signal()),
    );
    workers.push(
        crate::broker::keys::KeyKeeper {
            broker: broker.clone(),
        }
        .start(shutdown.signal()),
    );
    let load: MappingLoader = Box::new(reload_mappings);
    workers.push(
        Reloader {
            broker: broker.clone(),
            mappings: config.source.clone().map(|p| (p, load)),
        }
        .start(shutdown.signal()),
    );

    // Health is reported before any listener serves.
    workers.push(
        HealthWorker {
            store: store.clone(),
            reporters,
        }
        .start(shutdown.signal())
        .await,
    );

    // gRPC over TCP: TLS with a serving certificate from our own CA, unless explicitly plaintext.
    let timeouts = config.grpc.timeouts;
    let bounds = ConnectionBounds {
        preface_timeout: timeouts.preface,
        idle_timeout: timeouts.idle,
    };
    // Every gRPC server pings its peers (dead ones are dropped) and bounds header lists.
    let grpc_server = move || {
        Server::builder()
            .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
            .http2_keepalive_interval(Some(timeouts.keepalive_interval))
            .http2_keepalive_timeout(Some(timeouts.keepalive_timeout))
    };
    let tcp_server = grpc_server().add_routes(tcp_routes);
    let mut rx = shutdown.signal();
    let stop = async move { rx.wait().await };
    let scheme = if config.grpc.insecure_plaintext {
        tracing::warn!(addr = %grpc_addr, "gRPC on TCP is plaintext (grpc.insecure_plaintext)");
        tasks.push(tokio::spawn(async move {
            tcp_server
                .serve_with_incoming_shutdown(
                    TcpListenerStream::new(grpc_tcp)
                        .map(move |c| c.map(|c| Guarded::new(c, bounds))),
                    stop,
                )
                .await
                .map_err(|e| format!("grpc tcp server: {e}"))
        }));
        "http"
    } else {
        let tls = tls_config(
            &config,
            &ca,
            &clock,
            client_cas_subjects,
            &shutdown,
            &mut workers,
        )?;
        let incoming = crate::api::tls::incoming(grpc_tcp, Arc::new(tls), shutdown.signal())
            .map(move |c| c.map(|c| Guarded::new(c, bounds)));
        tasks.push(tokio::spawn(async move {
            tcp_server
                .serve_with_incoming_shutdown(incoming, stop)
                .await
                .map_err(|e| format!("grpc tcp server: {e}"))
        }));
        "https"
    };

    let socket_listener = bind_socket(&config.grpc.socket).await?;
    let mut rx = shutdown.signal();
    tasks.push(tokio::spawn(async move {
        grpc_server()
            .add_routes(unix_routes)
            .serve_with_incoming_shutdown(unix_incoming(socket_listener, bounds), async move {
                rx.wait().await;
            })
            .await
            .map_err(|e| format!("grpc unix server: {e}"))
    }));

    if let (Some(path), Some(routes)) = (&config.workload_socket, workload_routes) {
        let listener = bind_socket(path).await?;
        let mut rx = shutdown.signal();
        tasks.push(tokio::spawn(async move {
            grpc_server()
                .add_routes(routes)
                .serve_with_incoming_shutdown(unix_incoming(listener, bounds), async move {
                    rx.wait().await;
                })
                .await
                .map_err(|e| format!("workload api server: {e}"))
        }));
    }

    let app = crate::http::router(broker.clone(), &public_url);
    let (rx, http_timeouts) = (shutdown.signal(), config.http.timeouts);
    tasks.push(tokio::spawn(async move {
        crate::http::serve(http_tcp, app, http_timeouts, rx).await
    }));

    let endpoints = Endpoints {
        trust_domain: config.trust_domain.to_string(),
        grpc_addr: format!("{scheme}://{grpc_addr}"),
        http_addr: public_url,
        broker_socket: config.grpc.socket.clone(),
        ca_bundle: config.data_dir.join(keys::BUNDLE),
        workload_socket: config.workload_socket.clone(),
        admin_token_file: config
            .admin_token_file
            .exists()
            .then(|| config.admin_token_file.clone()),
    };
    endpoints
        .write(&config.data_dir)
        .map_err(|e| StartError::Setup(format!("writing endpoints.json: {e}")))?;
    tracing::info!(
        trust_domain = %config.trust_domain,
        grpc = %endpoints.grpc_addr,
        http = %endpoints.http_addr,
        socket = %endpoints.broker_socket.display(),
        "broker serving"
    );
    Ok(Running {
        endpoints,
        broker,
        shutdown,
        tasks,
        workers,
        sqlite,
        data_dir: config.data_dir,
    })
}
