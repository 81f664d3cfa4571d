//! Envoy's Secret Discovery Service (`envoy.service.secret.v3.SecretDiscoveryService`) on the
//! Workload API socket, the way SPIRE's agent serves it.
//!
//! The caller is attested from its peer credentials like any Workload API caller, and one
//! `StreamSecrets` stream is one task: its X.509-SVIDs belong to the task, are renewed at half
//! their lifetime (pushed as a new version), and are revoked when the stream ends (Envoy
//! exiting revokes its SVIDs). Resource names:
//! - `default`, or one of the caller's SPIFFE IDs: a `tls_certificate` (chain and key, PEM);
//! - `ROOTCA`, or the trust domain (`example.org` or `spiffe://example.org`): a
//!   `validation_context` with the trust bundle (and the CRL, when it fits);
//! - `ALL`: a `validation_context` with every trust domain's bundle known to the broker.
//!
//! An empty request asks for everything the caller may have (its SVIDs and the bundle). Names
//! the broker does not know are left out of the response, as xDS expects. ACKs (a request
//! repeating the names of the last response with its nonce) are not answered; NACKs are logged.

use std::pin::Pin;
use std::sync::Arc;

use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::pb::envoy::config::core::v3::{DataSource, data_source};
use super::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, TlsCertificate, secret,
};
use super::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use super::pb::envoy::service::secret::v3::secret_discovery_service_server;
use super::status::to_status;
use crate::broker::workload::{WorkloadStreams, X509Update};
use crate::broker::{Broker, X509Request};
use crate::id::SpiffeId;

/// The type of every resource SDS serves.
pub const SECRET_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// Most resource names one request may ask for.
const MAX_NAMES: usize = 64;
/// Longest resource name accepted.
const MAX_NAME: usize = 2048;

/// The SDS service.
pub struct SdsService {
    broker: Arc<Broker>,
    streams: Arc<WorkloadStreams>,
}

impl SdsService {
    /// A service over the Workload API's streams.
    pub fn new(broker: Arc<Broker>, streams: Arc<WorkloadStreams>) -> Self {
        Self { broker, streams }
    }
}

fn pem(label: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(label, der.to_vec()))
}

fn inline(bytes: Vec<u8>) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(data_source::Specifier::InlineBytes(bytes)),
    })
}

/// The resource names of a request, validated.
fn names(req: &DiscoveryRequest) -> Result<Vec<String>, Status> {
    if !req.type_url.is_empty() && req.type_url != SECRET_TYPE {
        return Err(Status::invalid_argument(format!(
            "type_url must be {SECRET_TYPE}"
        )));
    }
    if req.resource_names.len() > MAX_NAMES {
        return Err(Status::invalid_argument(format!(
            "at most {MAX_NAMES} resource names"
        )));
    }
    if req.resource_names.iter().any(|n| n.len() > MAX_NAME) {
        return Err(Status::invalid_argument(format!(
            "resource names are at most {MAX_NAME} bytes"
        )));
    }
    Ok(req.resource_names.clone())
}

/// What SDS answers for `names` from the session's current SVIDs and CRL.
fn secrets(broker: &Broker, update: &X509Update, names: &[String]) -> Vec<Secret> {
    let td = broker.trust_domain();
    let td_name = td.to_string();
    let td_uri = td.id_uri();
    let bundle: Vec<u8> = broker
        .ca()
        .keys()
        .roots
        .iter()
        .flat_map(|r| pem("CERTIFICATE", r).into_bytes())
        .collect();
    let validation = |name: &str| Secret {
        name: name.to_owned(),
        r#type: Some(secret::Type::ValidationContext(
            CertificateValidationContext {
                trusted_ca: inline(bundle.clone()),
                crl: update
                    .crl
                    .first()
                    .map(|crl| pem("X509 CRL", crl).into_bytes())
                    .and_then(inline),
            },
        )),
    };
    let certificate = |name: &str, m: &crate::broker::MintedX509| {
        let chain: Vec<u8> = m
            .svid
            .cert_chain
            .iter()
            .flat_map(|c| pem("CERTIFICATE", c).into_bytes())
            .collect();
        let key = m
            .svid
            .private_key
            .as_ref()
            .map(|k| pem("PRIVATE KEY", k.expose()).into_bytes())
            .unwrap_or_default();
        Secret {
            name: name.to_owned(),
            r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                certificate_chain: inline(chain),
                private_key: inline(key),
            })),
        }
    };
    if names.is_empty() {
        let mut all: Vec<Secret> = update
            .svids
            .iter()
            .map(|m| certificate(m.spiffe_id.as_str(), m))
            .collect();
        all.push(validation(&td_uri));
        return all;
    }
    names
        .iter()
        .filter_map(|name| match name.as_str() {
            "default" => update.svids.first().map(|m| certificate(name, m)),
            "ROOTCA" | "ALL" => Some(validation(name)),
            n if n == td_name || n == td_uri => Some(validation(name)),
            n => update
                .svids
                .iter()
                .find(|m| m.spiffe_id.as_str() == n)
                .map(|m| certificate(name, m)),
        })
        .collect()
}

fn response(version: u64, secrets: Vec<Secret>) -> DiscoveryResponse {
    DiscoveryResponse {
        version_info: version.to_string(),
        resources: secrets
            .into_iter()
            .map(|s| prost_types::Any {
                type_url: SECRET_TYPE.to_owned(),
                value: s.encode_to_vec(),
            })
            .collect(),
        canary: false,
        type_url: SECRET_TYPE.to_owned(),
        nonce: uuid::Uuid::now_v7().simple().to_string(),
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl secret_discovery_service_server::SecretDiscoveryService for SdsService {
    type StreamSecretsStream = ResponseStream;

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let evidence = super::evidence(&request);
        let mut inbound = request.into_inner();
        let first = inbound.message().await?.ok_or_else(|| {
            Status::invalid_argument("the stream closed before its first request")
        })?;
        let mut wanted = names(&first)?;
        let session = self
            .broker
            .workload_open(&evidence)
            .await
            .map_err(|e| to_status(&e))?;
        let mut updates = self.streams.x509_svids(evidence, session);
        let broker = self.broker.clone();
        let (tx, rx) = mpsc::channel::<Result<DiscoveryResponse, Status>>(4);
        tokio::spawn(async move {
            let mut current: Option<X509Update> = None;
            let mut version = 0u64;
            let mut last_nonce = String::new();
            let mut last_sent: Vec<String> = Vec::new();
            loop {
                let send = tokio::select! {
                    () = tx.closed() => break,
                    update = updates.recv() => match update {
                        Some(Ok(u)) => {
                            // A CRL-only update changes nothing Envoy is given unless it asked for
                            // a validation context; any update is a new version.
                            current = Some(u);
                            true
                        }
                        Some(Err(e)) => {
                            let _ = tx.send(Err(to_status(&e))).await;
                            break;
                        }
                        None => break,
                    },
                    msg = inbound.message() => match msg {
                        Ok(Some(req)) => {
                            if let Some(e) = &req.error_detail {
                                tracing::warn!(code = e.code, message = %crate::attest::shown(&e.message), "Envoy rejected an SDS response (NACK)");
                            }
                            match names(&req) {
                                Ok(n) => {
                                    let ack = req.response_nonce == last_nonce && n == last_sent;
                                    wanted = n;
                                    !ack
                                }
                                Err(status) => {
                                    let _ = tx.send(Err(status)).await;
                                    break;
                                }
                            }
                        }
                        // Envoy closed the stream (or it broke): the task ends below.
                        Ok(None) | Err(_) => break,
                    },
                };
                let Some(update) = current.as_ref().filter(|_| send) else {
                    continue;
                };
                version += 1;
                let reply = response(version, secrets(&broker, update, &wanted));
                last_nonce.clone_from(&reply.nonce);
                last_sent.clone_from(&wanted);
                if tx.send(Ok(reply)).await.is_err() {
                    break;
                }
            }
            // Dropping `updates` ends the session's stream, which ends its task and revokes
            // every SVID it carried.
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn fetch_secrets(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        // A one-shot fetch has no stream to bind a task to: its SVIDs are standalone leases,
        // minted and audited like `MintX509Svid` (revocable by an admin, a lock or a policy
        // change) and valid until they expire.
        let evidence = super::evidence(&request);
        let wanted = names(request.get_ref())?;
        let mut ids: Vec<Option<SpiffeId>> = Vec::new();
        for name in &wanted {
            match name.as_str() {
                "default" => ids.push(None),
                n if n.starts_with("spiffe://") && n != self.broker.trust_domain().id_uri() => {
                    let id = n
                        .parse::<SpiffeId>()
                        .map_err(|e| Status::invalid_argument(format!("resource name: {e}")))?;
                    ids.push(Some(id));
                }
                _ => {}
            }
        }
        if wanted.is_empty() {
            ids.push(None);
        }
        // `default` answers with the first SVID: the default identity's goes first.
        ids.sort_by_key(Option::is_some);
        ids.dedup();
        let mut svids = Vec::with_capacity(ids.len());
        for spiffe_id in ids {
            let minted = self
                .broker
                .mint_x509(
                    &evidence,
                    X509Request {
                        spiffe_id,
                        ..X509Request::default()
                    },
                )
                .await
                .map_err(|e| to_status(&e))?;
            svids.push(minted);
        }
        let update = X509Update {
            svids: Arc::new(svids),
            crl: self.streams.crl(),
            roots: self.broker.ca().keys().roots.clone(),
        };
        Ok(Response::new(response(
            1,
            secrets(&self.broker, &update, &wanted),
        )))
    }
}
