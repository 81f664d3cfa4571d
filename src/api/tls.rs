//! The broker's TLS listener for gRPC on TCP.
//!
//! Client certificates are requested but optional, and their chain is *not* judged during the
//! handshake: the handshake only proves the client holds the certificate's key (the TLS
//! signature is verified). Whether the chain is trusted is the `x509pop` attestor's decision, so
//! an untrusted or expired certificate gets a gRPC `Unauthenticated` with a reason instead of an
//! opaque handshake failure. Handshakes are bounded in time and concurrency.
//!
//! The serving certificate is a [`ServingCert`]: replaced while the listener runs (before it
//! ends, and when the intermediate that signed it changes), read on every handshake.

use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

/// Time allowed for one TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most handshakes in progress at once.
pub const MAX_PENDING_HANDSHAKES: usize = 256;

/// Requests a client certificate, verifies the handshake signature, defers the chain.
#[derive(Debug)]
struct DeferredClientAuth {
    hints: Vec<DistinguishedName>,
    algs: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for DeferredClientAuth {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // The chain is verified per request by the x509pop attestor (see module docs).
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// The serving certificate and key in force; [`ServingCert::set`] replaces them for the
/// handshakes that follow.
#[derive(Debug)]
pub struct ServingCert(RwLock<Arc<CertifiedKey>>);

fn certified(
    chain: Vec<CertificateDer<'static>>,
    key: &PrivateKeyDer<'static>,
) -> Result<Arc<CertifiedKey>, rustls::Error> {
    let signing = rustls::crypto::ring::sign::any_ecdsa_type(key)?;
    Ok(Arc::new(CertifiedKey::new(chain, signing)))
}

impl ServingCert {
    /// A serving certificate: the chain (leaf first) and the leaf's private key.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: &PrivateKeyDer<'static>,
    ) -> Result<Self, rustls::Error> {
        Ok(Self(RwLock::new(certified(chain, key)?)))
    }

    /// Serves `chain` and `key` from the next handshake on.
    pub fn set(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: &PrivateKeyDer<'static>,
    ) -> Result<(), rustls::Error> {
        let next = certified(chain, key)?;
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = next;
        Ok(())
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.0
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        )
    }
}

/// A rustls server configuration for gRPC (ALPN h2) serving `cert`. With `client_ca_subjects`
/// (DER subjects of the client CAs, sent as hints), client certificates are requested.
pub fn server_config(
    cert: Arc<ServingCert>,
    client_ca_subjects: Option<Vec<DistinguishedName>>,
) -> Result<ServerConfig, rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let algs = provider.signature_verification_algorithms;
    let builder =
        ServerConfig::builder_with_provider(provider).with_safe_default_protocol_versions()?;
    let mut config = match client_ca_subjects {
        Some(hints) => builder
            .with_client_cert_verifier(Arc::new(DeferredClientAuth { hints, algs }))
            .with_cert_resolver(cert),
        None => builder.with_no_client_auth().with_cert_resolver(cert),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Accepts TCP connections and yields completed TLS streams; failed handshakes are dropped
/// (logged at debug) without disturbing the server. Stops when `shutdown` turns true.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    mut shutdown: crate::shutdown::ShutdownSignal,
) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    let pending = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = shutdown.wait() => return,
                a = listener.accept() => a,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Small request/response messages: no Nagle delay (it costs ~40 ms a call with
            // delayed ACKs).
            let _ = tcp.set_nodelay(true);
            let Ok(permit) = pending.clone().try_acquire_owned() else {
                tracing::warn!(%peer, "too many TLS handshakes in progress; connection dropped");
                continue;
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
