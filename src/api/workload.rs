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

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::pb::workload::{
    JwtBundlesRequest, JwtBundlesResponse, Jwtsvid, JwtsvidRequest, JwtsvidResponse,
    ValidateJwtsvidRequest, ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse,
    X509svid, X509svidRequest, X509svidResponse, spiffe_workload_api_server,
};
use super::status::to_status;
use crate::broker::workload::{WorkloadStreams, X509Update};
use crate::broker::{Broker, BrokerError};
use crate::id::{Audience, SpiffeId};

/// The security header every Workload API call must carry.
pub const HEADER: &str = "workload.spiffe.io";

/// The `SpiffeWorkloadAPI` service.
pub struct WorkloadService {
    broker: Arc<Broker>,
    streams: Arc<WorkloadStreams>,
}

impl WorkloadService {
    /// A service over `broker`.
    pub fn new(broker: Arc<Broker>, streams: Arc<WorkloadStreams>) -> Self {
        Self { broker, streams }
    }

    /// Admits a call that needs no particular identity but some identity: the security header,
    /// then attestation and mapping.
    async fn admit<T>(&self, request: &Request<T>, action: &'static str) -> Result<(), Status> {
        self.check_header(request, action)?;
        self.broker
            .workload_identified(&super::evidence(request))
            .await
            .map_err(|e| to_status(&e))
    }
}

impl WorkloadService {
    /// The security header every call must carry; a call without it is refused, and audited.
    fn check_header<T>(&self, request: &Request<T>, action: &'static str) -> Result<(), Status> {
        match request.metadata().get(HEADER).and_then(|v| v.to_str().ok()) {
            Some("true") => Ok(()),
            _ => Err(self.refuse(
                &super::evidence(request),
                action,
                &BrokerError::BadRequest {
                    field: HEADER,
                    reason: format!(
                        "security header missing: requests must carry the metadata {HEADER}: true"
                    ),
                },
            )),
        }
    }

    /// A request refused before the core: audited like every decision.
    fn refuse(
        &self,
        evidence: &crate::attest::Evidence,
        action: &'static str,
        e: &BrokerError,
    ) -> Status {
        self.broker.refused(evidence, action, e);
        to_status(e)
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

fn stream<T: Send + 'static>(
    s: impl Stream<Item = Result<T, Status>> + Send + 'static,
) -> Response<Stream_<T>> {
    Response::new(Box::pin(s))
}

fn x509_response(update: X509Update) -> X509svidResponse {
    let bundle = concat(&update.roots);
    X509svidResponse {
        svids: update
            .svids
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
                bundle: bundle.clone(),
                hint: hint(&m.spiffe_id),
            })
            .collect(),
        crl: update.crl,
        federated_bundles: HashMap::new(),
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
        self.check_header(&request, "FetchX509SVID")?;
        let evidence = super::evidence(&request);
        let session = self
            .broker
            .workload_open(&evidence)
            .await
            .map_err(|e| to_status(&e))?;
        let updates = self.streams.x509_svids(evidence, session);
        Ok(stream(
            ReceiverStream::new(updates).map(|u| u.map(x509_response).map_err(|e| to_status(&e))),
        ))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        self.admit(&request, "FetchX509Bundles").await?;
        let td = self.broker.trust_domain().id_uri();
        let broker = self.broker.clone();
        // A new key set rebuilds the CRLs, so a new root reaches the stream with them.
        let crls = self.streams.x509_bundles();
        Ok(stream(ReceiverStream::new(crls).map(move |crl| {
            Ok(X509BundlesResponse {
                crl,
                bundles: [(td.clone(), concat(&broker.ca().keys().roots))].into(),
            })
        })))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        self.check_header(&request, "FetchJWTSVID")?;
        let evidence = super::evidence(&request);
        let req = request.into_inner();
        let parsed = (|| {
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
            Ok((audiences, only))
        })();
        let (audiences, only) = parsed.map_err(|e| self.refuse(&evidence, "FetchJWTSVID", &e))?;
        let result = self
            .broker
            .workload_jwts(&evidence, &audiences, only.as_ref())
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
        self.admit(&request, "FetchJWTBundles").await?;
        let (tx, rx) = mpsc::channel::<Result<JwtBundlesResponse, Status>>(2);
        let broker = self.broker.clone();
        tokio::spawn(async move {
            // Every new key set is sent: a prepared JWT key reaches the stream before it signs.
            let mut keys = broker.ca().subscribe();
            let mut sent = String::new();
            loop {
                let jwks = keys.borrow_and_update().jwks_json.clone();
                if jwks != sent {
                    let msg = JwtBundlesResponse {
                        bundles: [(broker.trust_domain().id_uri(), jwks.clone().into_bytes())]
                            .into(),
                    };
                    if tx.send(Ok(msg)).await.is_err() {
                        return;
                    }
                    sent = jwks;
                }
                tokio::select! {
                    () = tx.closed() => return,
                    () = broker.closed() => return,
                    changed = keys.changed() => if changed.is_err() { return },
                }
            }
        });
        Ok(stream(ReceiverStream::new(rx)))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        self.admit(&request, "ValidateJWTSVID").await?;
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
