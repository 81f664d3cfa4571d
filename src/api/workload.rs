//! The SPIFFE Workload API (`SpiffeWorkloadAPI`) on its own Unix socket, for unmodified SPIFFE
//! clients (go-spiffe, py-spiffe, the `spiffe` crate, spiffe-helper, Envoy).
//!
//! Every call must carry the `workload.spiffe.io: true` metadata (else `InvalidArgument`) and
//! is attested from the caller's peer credentials; callers without an identity that policy
//! permits get `PermissionDenied`. One `FetchX509SVID` stream is one task: its SVIDs are bound
//! to the task, renewed at half their lifetime, and revoked when the stream ends. Streams send
//! the full state at once and again on every change (rotation, revocation, new CRL); CRL-only
//! updates are paced and a CRL too large for SPIFFE clients is left out
//! ([`WorkloadApiSettings`]).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::pb::workload::{
    JwtBundlesRequest, JwtBundlesResponse, Jwtsvid, JwtsvidRequest, JwtsvidResponse,
    ValidateJwtsvidRequest, ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse,
    X509svid, X509svidRequest, X509svidResponse, spiffe_workload_api_server,
};
use super::status::to_status;
use crate::broker::{Broker, BrokerError, MintedX509, WorkloadSession};
use crate::config::WorkloadApiSettings;
use crate::id::{Audience, SpiffeId};

/// The security header every Workload API call must carry.
pub const HEADER: &str = "workload.spiffe.io";

/// The `SpiffeWorkloadAPI` service.
pub struct WorkloadService {
    broker: Arc<Broker>,
    crl: Arc<CrlFeed>,
}

impl WorkloadService {
    /// A service over `broker`.
    pub fn new(broker: Arc<Broker>, settings: WorkloadApiSettings) -> Self {
        Self {
            crl: Arc::new(CrlFeed {
                broker: broker.clone(),
                settings,
                omitting: AtomicBool::new(false),
            }),
            broker,
        }
    }

    /// Admits a call that needs no particular identity but some identity: the security header,
    /// then attestation and mapping.
    async fn admit<T>(&self, request: &Request<T>) -> Result<(), Status> {
        check_header(request)?;
        self.broker
            .workload_identified(&super::evidence(request))
            .await
            .map_err(|e| to_status(&e))
    }
}

fn check_header<T>(request: &Request<T>) -> Result<(), Status> {
    match request.metadata().get(HEADER).and_then(|v| v.to_str().ok()) {
        Some("true") => Ok(()),
        _ => Err(Status::invalid_argument(format!(
            "security header missing: requests must carry the metadata {HEADER}: true"
        ))),
    }
}

/// The hint of an identity: its path without the leading slash (unique per caller).
fn hint(id: &SpiffeId) -> String {
    id.path().trim_start_matches('/').to_owned()
}

fn concat(ders: &[Vec<u8>]) -> Vec<u8> {
    ders.concat()
}

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn stream<T: Send + 'static>(rx: mpsc::Receiver<Result<T, Status>>) -> Response<Stream_<T>> {
    Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
}

/// The CRL as the streams carry it: the broker's current one, shared, unless it is larger than
/// `crl_max_bytes`.
struct CrlFeed {
    broker: Arc<Broker>,
    settings: WorkloadApiSettings,
    /// Whether the last look found the CRL too large (logged when this changes).
    omitting: AtomicBool,
}

impl CrlFeed {
    /// The `crl` field of a response.
    fn field(&self) -> Vec<Bytes> {
        let crl = self.broker.crl();
        if crl.is_empty() {
            return Vec::new();
        }
        let limit = self.settings.crl_max_bytes;
        let too_big = crl.len() > limit;
        if limit > 0 && self.omitting.swap(too_big, Ordering::Relaxed) != too_big {
            if too_big {
                tracing::warn!(
                    crl_bytes = crl.len(),
                    limit,
                    "the CRL is larger than workload_api.crl_max_bytes: Workload API responses \
                     leave it out until it shrinks; relying parties read it from /crl"
                );
            } else {
                tracing::info!(
                    crl_bytes = crl.len(),
                    "the CRL fits workload_api.crl_max_bytes again: Workload API responses carry it"
                );
            }
        }
        if too_big { Vec::new() } else { vec![crl] }
    }

    fn pacer(&self) -> CrlPacer {
        CrlPacer {
            interval: self.settings.crl_push_interval,
            last: None,
            due: None,
        }
    }
}

/// Paces one stream's CRL-only updates: a new CRL is sent no sooner than `interval` after the
/// last response, and not at all while it is left out. A client then keeps the last CRL it was
/// given (signed, and valid until its `nextUpdate`) rather than being told of an empty one.
struct CrlPacer {
    interval: Duration,
    /// When the last response was sent.
    last: Option<tokio::time::Instant>,
    /// When the pending CRL update is due.
    due: Option<tokio::time::Instant>,
}

impl CrlPacer {
    /// A response was sent.
    fn sent(&mut self) {
        self.last = Some(tokio::time::Instant::now());
        self.due = None;
    }

    /// The broker's CRL changed: schedule an update.
    fn changed(&mut self) {
        let now = tokio::time::Instant::now();
        self.due
            .get_or_insert_with(|| self.last.map_or(now, |l| (l + self.interval).max(now)));
    }

    /// Resolves when an update is due.
    async fn due(&self) {
        match self.due {
            Some(t) => tokio::time::sleep_until(t).await,
            None => std::future::pending().await,
        }
    }

    /// The update is due with `crl`: whether to send it (only with a CRL to carry).
    fn take(&mut self, crl: &[Bytes]) -> bool {
        self.due = None;
        !crl.is_empty()
    }
}

fn x509_response(svids: &[MintedX509], crl: Vec<Bytes>) -> X509svidResponse {
    X509svidResponse {
        svids: svids
            .iter()
            .map(|m| X509svid {
                spiffe_id: m.spiffe_id.to_string(),
                x509_svid: concat(&m.svid.cert_chain),
                x509_svid_key: m
                    .svid
                    .private_key
                    .as_ref()
                    .map(|k| k.expose().clone())
                    .unwrap_or_default(),
                bundle: concat(&m.bundle),
                hint: hint(&m.spiffe_id),
            })
            .collect(),
        crl,
        federated_bundles: HashMap::new(),
    }
}

/// Half the remaining lifetime of the shortest-lived SVID: when to renew.
fn renew_after(svids: &[MintedX509], now: SystemTime) -> Duration {
    svids
        .iter()
        .map(|m| m.svid.not_after.duration_since(now).unwrap_or_default() / 2)
        .min()
        .unwrap_or(Duration::from_secs(60))
        .max(Duration::from_secs(1))
}

/// Serves one `FetchX509SVID` stream until the client leaves, the task ends, or shutdown.
async fn x509_stream(
    broker: Arc<Broker>,
    feed: Arc<CrlFeed>,
    evidence: crate::attest::Evidence,
    session: WorkloadSession,
    tx: mpsc::Sender<Result<X509svidResponse, Status>>,
) {
    let mut revocations = broker.bus().subscribe();
    let mut crl_updates = broker.crl_updates();
    let heartbeat = Duration::from_secs(
        u64::try_from(session.task.heartbeat_secs)
            .unwrap_or(10)
            .max(1),
    );
    // The task was stored with its first due time: the first keep-alive is one heartbeat away.
    let mut keep_alive =
        tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
    let mut written_due = session.task.due_at;
    let mut svids = Vec::new();
    let mut renew = tokio::time::Instant::now();
    let mut pacer = feed.pacer();
    loop {
        if tokio::time::Instant::now() >= renew {
            match broker.workload_svids(&evidence, &session).await {
                Ok(fresh) => {
                    svids = fresh;
                    renew = tokio::time::Instant::now() + renew_after(&svids, broker.clock().now());
                    let crl = feed.field();
                    pacer.sent();
                    if tx.send(Ok(x509_response(&svids, crl))).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(to_status(&e))).await;
                    break;
                }
            }
        }
        tokio::select! {
            () = tx.closed() => break,
            () = tokio::time::sleep_until(renew) => {}
            _ = keep_alive.tick() => {
                if let Ok(false) = broker.ping(&session.task, &mut written_due).await {
                    let _ = tx.send(Err(Status::permission_denied("the workload's task has ended"))).await;
                    return;
                }
            }
            changed = crl_updates.changed() => {
                if changed.is_err() {
                    break;
                }
                pacer.changed();
            }
            () = pacer.due() => {
                let crl = feed.field();
                if pacer.take(&crl) {
                    pacer.sent();
                    if tx.send(Ok(x509_response(&svids, crl))).await.is_err() {
                        break;
                    }
                }
            }
            ev = revocations.recv() => match ev {
                Ok(r) if r.task_id.as_deref() == Some(session.task.id.as_str()) => {
                    // The task was revoked or ended: every SVID of the stream is withdrawn.
                    let _ = tx
                        .send(Err(Status::permission_denied(format!("identity withdrawn: {}", r.reason))))
                        .await;
                    return;
                }
                Ok(r) if r.lease_id.as_ref().is_some_and(|l| svids.iter().any(|s| &s.lease_id == l)) => {
                    // One SVID was revoked: replace it (and its siblings) at once.
                    renew = tokio::time::Instant::now();
                }
                _ => {}
            },
            () = broker.closed() => {
                let _ = tx.send(Err(Status::unavailable("broker shutting down"))).await;
                return;
            }
        }
    }
    if let Err(e) = broker.workload_close(&session).await {
        tracing::warn!(task_id = %session.task.id, error = %e, "cannot end the workload's task");
    }
}

fn json_to_prost(v: &serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(json_to_prost).collect(),
        }),
        serde_json::Value::Object(o) => Kind::StructValue(prost_types::Struct {
            fields: o
                .iter()
                .map(|(k, v)| (k.clone(), json_to_prost(v)))
                .collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

#[tonic::async_trait]
impl spiffe_workload_api_server::SpiffeWorkloadApi for WorkloadService {
    type FetchX509SVIDStream = Stream_<X509svidResponse>;
    type FetchX509BundlesStream = Stream_<X509BundlesResponse>;
    type FetchJWTBundlesStream = Stream_<JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        check_header(&request)?;
        let evidence = super::evidence(&request);
        let session = self
            .broker
            .workload_open(&evidence)
            .await
            .map_err(|e| to_status(&e))?;
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(x509_stream(
            self.broker.clone(),
            self.crl.clone(),
            evidence,
            session,
            tx,
        ));
        Ok(stream(rx))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        self.admit(&request).await?;
        let (tx, rx) = mpsc::channel(4);
        let (broker, feed) = (self.broker.clone(), self.crl.clone());
        tokio::spawn(async move {
            let mut crl_updates = broker.crl_updates();
            let mut pacer = feed.pacer();
            let td = broker.trust_domain().id_uri();
            let bundles = || [(td.clone(), concat(broker.ca().x509.roots()))].into();
            let crl = feed.field();
            pacer.sent();
            let first = X509BundlesResponse {
                crl,
                bundles: bundles(),
            };
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            loop {
                tokio::select! {
                    () = tx.closed() => return,
                    () = broker.closed() => return,
                    changed = crl_updates.changed() => match changed {
                        Ok(()) => pacer.changed(),
                        Err(_) => return,
                    },
                    () = pacer.due() => {
                        let crl = feed.field();
                        if pacer.take(&crl) {
                            pacer.sent();
                            let msg = X509BundlesResponse { crl, bundles: bundles() };
                            if tx.send(Ok(msg)).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        });
        Ok(stream(rx))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        check_header(&request)?;
        let evidence = super::evidence(&request);
        let req = request.into_inner();
        let result = async {
            let audiences = Audience::parse_list(&req.audience).map_err(|source| {
                BrokerError::InvalidArgument {
                    field: "audience",
                    source,
                }
            })?;
            let only = if req.spiffe_id.is_empty() {
                None
            } else {
                Some(req.spiffe_id.parse::<SpiffeId>().map_err(|source| {
                    BrokerError::InvalidArgument {
                        field: "spiffe_id",
                        source,
                    }
                })?)
            };
            self.broker
                .workload_jwts(&evidence, &audiences, only.as_ref())
                .await
        }
        .await;
        let minted = result.map_err(|e| to_status(&e))?;
        Ok(Response::new(JwtsvidResponse {
            svids: minted
                .into_iter()
                .map(|m| Jwtsvid {
                    hint: hint(&m.spiffe_id),
                    spiffe_id: m.spiffe_id.to_string(),
                    svid: m.token.into_inner(),
                })
                .collect(),
        }))
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        self.admit(&request).await?;
        let (tx, rx) = mpsc::channel(2);
        let broker = self.broker.clone();
        tokio::spawn(async move {
            let msg = JwtBundlesResponse {
                bundles: [(
                    broker.trust_domain().id_uri(),
                    broker.ca().jwks_json.clone().into_bytes(),
                )]
                .into(),
            };
            if tx.send(Ok(msg)).await.is_err() {
                return;
            }
            // JWT keys change only with a key rotation, which restarts the broker today: the
            // stream stays open so clients keep their subscription.
            tokio::select! {
                () = tx.closed() => {}
                () = broker.closed() => {}
            }
        });
        Ok(stream(rx))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        self.admit(&request).await?;
        let req = request.into_inner();
        if req.audience.is_empty() || req.svid.is_empty() {
            return Err(Status::invalid_argument("audience and svid are required"));
        }
        let (spiffe_id, claims) = self
            .broker
            .validate_jwt(&req.svid, &req.audience)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(ValidateJwtsvidResponse {
            spiffe_id,
            claims: Some(prost_types::Struct {
                fields: claims
                    .iter()
                    .map(|(k, v)| (k.clone(), json_to_prost(v)))
                    .collect(),
            }),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crl_updates_are_paced_and_never_sent_without_a_crl() {
        let interval = Duration::from_secs(1);
        let mut pacer = CrlPacer {
            interval,
            last: None,
            due: None,
        };
        let before = tokio::time::Instant::now();
        // Before any response, a change is due at once.
        pacer.changed();
        assert!(pacer.due.is_some_and(|d| d <= tokio::time::Instant::now()));
        pacer.sent();
        let sent = pacer.last.unwrap();
        assert!(sent >= before);
        assert_eq!(pacer.due, None);
        // Changes right after a response wait out the interval, however many arrive.
        pacer.changed();
        pacer.changed();
        assert!(pacer.due.is_some_and(|d| d >= sent + interval));
        let crl = vec![Bytes::from_static(b"crl")];
        assert!(pacer.take(&crl));
        assert_eq!(pacer.due, None, "taken");
        // A CRL left out (too large) is not sent as an update: the client keeps its last one.
        pacer.changed();
        assert!(!pacer.take(&[]));
        // Long after the last response, a change is due at once.
        pacer.last = Some(tokio::time::Instant::now() - 2 * interval);
        pacer.changed();
        assert!(pacer.due.is_some_and(|d| d <= tokio::time::Instant::now()));
    }
}
