//! `ephemera.v1.Broker`: translates requests into typed broker requests.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::pb::v1::{
    MintJwtSvidRequest, MintJwtSvidResponse, MintX509SvidRequest, MintX509SvidResponse,
    broker_server,
};
use super::status::to_status;
use crate::broker::{Broker, BrokerError, JwtRequest, X509Request};
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
}

fn ttl(secs: Option<u64>) -> Result<Option<Ttl>, BrokerError> {
    secs.map(Ttl::from_secs)
        .transpose()
        .map_err(|source| BrokerError::InvalidArgument {
            field: "ttl_seconds",
            source,
        })
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

#[tonic::async_trait]
impl broker_server::Broker for BrokerService {
    async fn mint_x509_svid(
        &self,
        request: Request<MintX509SvidRequest>,
    ) -> Result<Response<MintX509SvidResponse>, Status> {
        let evidence = super::evidence(&request);
        let req = request.into_inner();
        let result = async {
            if req.csr.len() > MAX_CSR_BYTES {
                return Err(BrokerError::Mint(crate::ca::MintError::CsrTooLarge {
                    size: req.csr.len(),
                    max: MAX_CSR_BYTES,
                }));
            }
            let typed = X509Request {
                ttl: ttl(req.ttl_seconds)?,
                spiffe_id: spiffe_id(&req.spiffe_id)?,
                csr: (!req.csr.is_empty()).then_some(req.csr),
            };
            self.broker.mint_x509(&evidence, typed).await
        }
        .await;
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
        }))
    }

    async fn mint_jwt_svid(
        &self,
        request: Request<MintJwtSvidRequest>,
    ) -> Result<Response<MintJwtSvidResponse>, Status> {
        let evidence = super::evidence(&request);
        let req = request.into_inner();
        let result = async {
            let typed = JwtRequest {
                audiences: Audience::parse_list(&req.audience).map_err(|source| {
                    BrokerError::InvalidArgument {
                        field: "audience",
                        source,
                    }
                })?,
                ttl: ttl(req.ttl_seconds)?,
                spiffe_id: spiffe_id(&req.spiffe_id)?,
            };
            self.broker.mint_jwt(&evidence, typed).await
        }
        .await;
        let minted = result.map_err(|e| to_status(&e))?;
        Ok(Response::new(MintJwtSvidResponse {
            spiffe_id: minted.spiffe_id.to_string(),
            token: minted.token.into_inner(),
            expires_at: minted.expires_at,
            jti: minted.jti,
        }))
    }
}
