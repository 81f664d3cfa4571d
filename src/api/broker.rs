//! `ephemera.v1.Broker`: translates requests into typed broker requests.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use std::pin::Pin;

use tokio_stream::{Stream, StreamExt};
use tonic::Streaming;

use super::pb::v1::{
    BeginTaskRequest, BeginTaskResponse, EndTaskRequest, EndTaskResponse, KeepAliveRequest,
    KeepAliveResponse, MintJwtSvidRequest, MintJwtSvidResponse, MintX509SvidRequest,
    MintX509SvidResponse, broker_server,
};
use super::status::to_status;
use crate::attest::{Evidence, shown};
use crate::broker::{self as core, Broker, BrokerError, JwtRequest, X509Request};
use crate::ca::x509::MAX_CSR_BYTES;
use crate::clock::unix_secs;
use crate::id::{Audience, SpiffeId, Ttl};

/// The `Broker` gRPC service.
#[derive(Clone)]
pub struct BrokerService {
    broker: Arc<Broker>,
}

impl BrokerService {
    /// A service over `broker`.
    pub fn new(broker: Arc<Broker>) -> Self {
        Self { broker }
    }

    /// A request refused before the core (a malformed field): audited like every decision.
    fn refuse(&self, evidence: &Evidence, action: &'static str, e: &BrokerError) -> Status {
        self.broker.refused(evidence, action, e);
        to_status(e)
    }
}

/// The typed `BeginTask` request, or why the fields are refused.
fn begin_task_request(req: BeginTaskRequest) -> Result<core::BeginTaskRequest, BrokerError> {
    if req.labels.len() > MAX_LABELS {
        return Err(BrokerError::BadRequest {
            field: "labels",
            reason: format!("at most {MAX_LABELS} labels"),
        });
    }
    for (k, v) in &req.labels {
        let ok_key = !k.is_empty()
            && k.len() <= 63
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'/'));
        if !ok_key || v.len() > 255 || v.chars().any(char::is_control) {
            return Err(BrokerError::BadRequest {
                field: "labels",
                reason: format!("invalid label {:?}", shown(k)),
            });
        }
    }
    let max_duration = match req.max_duration_seconds {
        None => None,
        Some(secs) => {
            Some(
                Ttl::from_secs(secs).map_err(|source| BrokerError::InvalidArgument {
                    field: "max_duration_seconds",
                    source,
                })?,
            )
        }
    };
    Ok(core::BeginTaskRequest {
        max_duration: max_duration.map(Ttl::duration),
        labels: req.labels.into_iter().collect(),
        scopes: scopes(req.scopes)?,
        spiffe_id: spiffe_id(&req.spiffe_id)?,
    })
}

/// The typed `MintX509Svid` request, or why the fields are refused.
fn x509_request(req: MintX509SvidRequest) -> Result<X509Request, BrokerError> {
    if req.csr.len() > MAX_CSR_BYTES {
        return Err(BrokerError::Mint(crate::ca::MintError::CsrTooLarge {
            size: req.csr.len(),
            max: MAX_CSR_BYTES,
        }));
    }
    Ok(X509Request {
        ttl: ttl(req.ttl_seconds)?,
        spiffe_id: spiffe_id(&req.spiffe_id)?,
        task_id: task_id(&req.task_id)?,
        csr: (!req.csr.is_empty()).then_some(req.csr),
    })
}

/// The typed `MintJwtSvid` request, or why the fields are refused.
fn jwt_request(req: MintJwtSvidRequest) -> Result<JwtRequest, BrokerError> {
    Ok(JwtRequest {
        audiences: Audience::parse_list(&req.audience).map_err(|source| {
            BrokerError::InvalidArgument {
                field: "audience",
                source,
            }
        })?,
        ttl: ttl(req.ttl_seconds)?,
        spiffe_id: spiffe_id(&req.spiffe_id)?,
        task_id: task_id(&req.task_id)?,
    })
}

fn ttl(secs: Option<u64>) -> Result<Option<Ttl>, BrokerError> {
    core::parse_ttl("ttl_seconds", secs)
}

/// Most scopes a task may declare.
const MAX_SCOPES: usize = 32;
/// Longest scope accepted.
const MAX_SCOPE: usize = 128;

/// A task's declared scopes, sorted and unique: each an RFC 6749 scope token (printable ASCII
/// without space, `"` or `\`), at most [`MAX_SCOPE`] bytes, at most [`MAX_SCOPES`] of them.
fn scopes(requested: Vec<String>) -> Result<Vec<String>, BrokerError> {
    let bad = |reason: String| BrokerError::BadRequest {
        field: "scopes",
        reason,
    };
    if requested.len() > MAX_SCOPES {
        return Err(bad(format!("at most {MAX_SCOPES} scopes")));
    }
    for s in &requested {
        let token = !s.is_empty()
            && s.len() <= MAX_SCOPE
            && s.bytes()
                .all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b));
        if !token {
            return Err(bad(format!(
                "invalid scope {:?}: 1 to {MAX_SCOPE} printable characters, no spaces, quotes or backslashes",
                shown(s)
            )));
        }
    }
    let mut scopes = requested;
    scopes.sort_unstable();
    scopes.dedup();
    Ok(scopes)
}

/// Longest task id accepted (a UUID is 36).
const MAX_TASK_ID: usize = 64;
/// Most labels on a task.
const MAX_LABELS: usize = 32;

fn task_id(s: &str) -> Result<Option<String>, BrokerError> {
    if s.is_empty() {
        return Ok(None);
    }
    if s.len() > MAX_TASK_ID || !s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(BrokerError::BadRequest {
            field: "task_id",
            reason: "not a task id".into(),
        });
    }
    Ok(Some(s.to_owned()))
}

fn spiffe_id(s: &str) -> Result<Option<SpiffeId>, BrokerError> {
    if s.is_empty() {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .map_err(|source| BrokerError::InvalidArgument {
            field: "spiffe_id",
            source,
        })
}

type KeepAliveStream = Pin<Box<dyn Stream<Item = Result<KeepAliveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl broker_server::Broker for BrokerService {
    type KeepAliveStream = KeepAliveStream;

    async fn begin_task(
        &self,
        request: Request<BeginTaskRequest>,
    ) -> Result<Response<BeginTaskResponse>, Status> {
        let evidence = super::evidence(&request);
        let req = request.into_inner();
        let typed = begin_task_request(req).map_err(|e| self.refuse(&evidence, "BeginTask", &e))?;
        let result = self.broker.begin_task(&evidence, typed).await;
        let task = result.map_err(|e| to_status(&e))?;
        Ok(Response::new(BeginTaskResponse {
            task_id: task.id,
            spiffe_id: task.spiffe_id,
            deadline: task.deadline,
            heartbeat_interval_seconds: u64::try_from(task.heartbeat_secs).unwrap_or(0),
            grace_seconds: u64::try_from(task.grace_secs).unwrap_or(0),
        }))
    }

    async fn keep_alive(
        &self,
        request: Request<Streaming<KeepAliveRequest>>,
    ) -> Result<Response<Self::KeepAliveStream>, Status> {
        let evidence = super::evidence(&request);
        let mut inbound = request.into_inner();
        let first = inbound.message().await?.unwrap_or_default();
        let id = task_id(&first.task_id)
            .and_then(|t| {
                t.ok_or(BrokerError::BadRequest {
                    field: "task_id",
                    reason: "required in the first message".into(),
                })
            })
            .map_err(|e| self.refuse(&evidence, "KeepAlive", &e))?;
        let (task, written_due) = self
            .broker
            .keep_alive_open(&evidence, &id)
            .await
            .map_err(|e| to_status(&e))?;
        let pings = inbound.map(|m| m.map(|m| m.task_id));
        let answers = self.broker.serve_keep_alive(task, written_due, pings);
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(answers).map(|a| {
                a.map(|deadline| KeepAliveResponse { deadline })
                    .map_err(|e| to_status(&e))
            }),
        )))
    }

    async fn end_task(
        &self,
        request: Request<EndTaskRequest>,
    ) -> Result<Response<EndTaskResponse>, Status> {
        let evidence = super::evidence(&request);
        let req = request.into_inner();
        let id = task_id(&req.task_id)
            .and_then(|t| {
                t.ok_or(BrokerError::BadRequest {
                    field: "task_id",
                    reason: "required".into(),
                })
            })
            .map_err(|e| self.refuse(&evidence, "EndTask", &e))?;
        let result = self.broker.end_task(&evidence, &id).await;
        let (state, already_ended) = result.map_err(|e| to_status(&e))?;
        Ok(Response::new(EndTaskResponse {
            state: state.as_str().to_owned(),
            already_ended,
        }))
    }

    async fn mint_x509_svid(
        &self,
        request: Request<MintX509SvidRequest>,
    ) -> Result<Response<MintX509SvidResponse>, Status> {
        let evidence = super::evidence(&request);
        let req = request.into_inner();
        let typed = x509_request(req).map_err(|e| self.refuse(&evidence, "MintX509Svid", &e))?;
        let result = self.broker.mint_x509(&evidence, typed).await;
        let minted = result.map_err(|e| to_status(&e))?;
        Ok(Response::new(MintX509SvidResponse {
            spiffe_id: minted.spiffe_id.to_string(),
            cert_chain: minted.svid.cert_chain,
            private_key: minted
                .svid
                .private_key
                .map(|k| k.into_inner())
                .unwrap_or_default(),
            bundle: minted.bundle,
            expires_at: unix_secs(minted.svid.not_after),
            serial: minted.svid.serial.to_string(),
            lease_id: minted.lease_id,
        }))
    }

    async fn mint_jwt_svid(
        &self,
        request: Request<MintJwtSvidRequest>,
    ) -> Result<Response<MintJwtSvidResponse>, Status> {
        let evidence = super::evidence(&request);
        let req = request.into_inner();
        let typed = jwt_request(req).map_err(|e| self.refuse(&evidence, "MintJwtSvid", &e))?;
        let result = self.broker.mint_jwt(&evidence, typed).await;
        let minted = result.map_err(|e| to_status(&e))?;
        Ok(Response::new(MintJwtSvidResponse {
            spiffe_id: minted.spiffe_id.to_string(),
            token: minted.token.into_inner(),
            expires_at: minted.expires_at,
            jti: minted.jti,
        }))
    }
}
