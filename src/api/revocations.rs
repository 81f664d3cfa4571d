//! `ephemera.v1.Revocations`: the revocation stream and introspection, for relying parties.
//!
//! Watch replays committed events after the caller's cursor from the store, then follows the
//! in-process bus; a gap on the bus is filled from the store, so each event is delivered once,
//! in order. Buffers are bounded: a watcher that falls behind is ended with `ABORTED` and its
//! cursor, and resumes from it.

use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::broadcast::error::RecvError;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::pb::v1::{
    IntrospectRequest, IntrospectResponse, RevocationEvent, RevokedCredential, WatchRequest,
    revocations_server,
};
use super::status::to_status;
use crate::broker::{Broker, BrokerError};
use crate::store::{LeaseKind, Revocation};

/// Events read from the store per page while catching up.
const PAGE: u32 = 256;
/// Events buffered per watcher.
const BUFFER: usize = 64;

/// The `Revocations` gRPC service.
pub struct RevocationsService {
    broker: Arc<Broker>,
}

impl RevocationsService {
    /// A service over `broker`.
    pub fn new(broker: Arc<Broker>) -> Self {
        Self { broker }
    }
}

async fn expand(broker: &Broker, r: &Revocation) -> Result<RevocationEvent, BrokerError> {
    let leases = broker.revoked_leases(r).await?;
    Ok(RevocationEvent {
        cursor: u64::try_from(r.seq).unwrap_or(0),
        revoked_at: r.at,
        reason: r.reason.clone(),
        task_id: r.task_id.clone().unwrap_or_default(),
        lease_id: r.lease_id.clone().unwrap_or_default(),
        spiffe_id: r.spiffe_id.clone().unwrap_or_default(),
        credentials: leases
            .iter()
            .map(|l| RevokedCredential {
                jti: if l.kind == LeaseKind::Jwt {
                    l.id.clone()
                } else {
                    String::new()
                },
                lease_id: l.id.clone(),
                spiffe_id: l.spiffe_id.clone(),
                serial: l.serial.clone().unwrap_or_default(),
                expires_at: l.expires_at,
            })
            .collect(),
    })
}

type Tx = tokio::sync::mpsc::Sender<Result<RevocationEvent, Status>>;

/// Sends every stored event after `*last`, advancing it. `false` when the watcher left.
async fn catch_up(broker: &Broker, last: &mut i64, tx: &Tx) -> Result<bool, BrokerError> {
    loop {
        let page = broker.revocations_after(*last, PAGE).await?;
        if page.is_empty() {
            return Ok(true);
        }
        for r in page {
            let ev = expand(broker, &r).await?;
            if tx.send(Ok(ev)).await.is_err() {
                return Ok(false);
            }
            *last = r.seq;
        }
    }
}

/// Follows the bus (`bus`, subscribed before `last` was settled) after event `last`.
async fn watch(
    broker: Arc<Broker>,
    mut bus: tokio::sync::broadcast::Receiver<Revocation>,
    mut last: i64,
    tx: Tx,
) {
    match catch_up(&broker, &mut last, &tx).await {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => {
            let _ = tx.send(Err(to_status(&e))).await;
            return;
        }
    }
    loop {
        match bus.recv().await {
            Ok(r) if r.seq <= last => {}
            Ok(r) if r.seq == last + 1 => match expand(&broker, &r).await {
                Ok(ev) => {
                    if tx.send(Ok(ev)).await.is_err() {
                        return;
                    }
                    last = r.seq;
                }
                Err(e) => {
                    let _ = tx.send(Err(to_status(&e))).await;
                    return;
                }
            },
            // A gap (or an event from before we caught up): fill it from the store.
            Ok(_) => match catch_up(&broker, &mut last, &tx).await {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => {
                    let _ = tx.send(Err(to_status(&e))).await;
                    return;
                }
            },
            Err(RecvError::Lagged(_)) => {
                let _ = tx
                    .send(Err(Status::aborted(format!(
                        "watcher fell behind; resume from cursor {last}"
                    ))))
                    .await;
                return;
            }
            Err(RecvError::Closed) => return,
        }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<RevocationEvent, Status>> + Send>>;

#[tonic::async_trait]
impl revocations_server::Revocations for RevocationsService {
    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let cursor = request.into_inner().cursor;
        // Where the stream starts is settled before the caller hears back: every event
        // committed after this call returns is delivered (the bus is subscribed first, so
        // nothing falls between the two). Without a cursor, it starts after the newest event.
        let bus = self.broker.bus().subscribe();
        let last = match cursor {
            Some(c) => i64::try_from(c).unwrap_or(i64::MAX),
            None => self
                .broker
                .newest_revocation()
                .await
                .map_err(|e| to_status(&e))?,
        };
        let (tx, rx) = tokio::sync::mpsc::channel(BUFFER);
        let broker = self.broker.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = watch(broker.clone(), bus, last, tx.clone()) => {}
                () = broker.closed() => {
                    let _ = tx.send(Err(Status::unavailable("broker shutting down; resume from your last cursor"))).await;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn introspect(
        &self,
        request: Request<IntrospectRequest>,
    ) -> Result<Response<IntrospectResponse>, Status> {
        let token = request.into_inner().token;
        let i = self
            .broker
            .introspect(&token)
            .await
            .map_err(|e| to_status(&e))?;
        if !i.active {
            return Ok(Response::new(IntrospectResponse::default()));
        }
        let str_of = |k: &str| {
            i.claims
                .get(k)
                .and_then(serde_json::Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        let int_of = |k: &str| {
            i.claims
                .get(k)
                .and_then(serde_json::Value::as_i64)
                .unwrap_or(0)
        };
        let aud = match i.claims.get("aud") {
            Some(serde_json::Value::String(a)) => vec![a.clone()],
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .filter_map(|a| a.as_str().map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        };
        Ok(Response::new(IntrospectResponse {
            active: true,
            sub: str_of("sub"),
            aud,
            exp: int_of("exp"),
            iat: int_of("iat"),
            jti: str_of("jti"),
            iss: str_of("iss"),
            task_id: i.task_id.unwrap_or_default(),
        }))
    }
}
