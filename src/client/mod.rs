//! Client side: finding a broker and connecting to it, for the CLI and for workloads that embed
//! the library.
//!
//! A broker is found from, in order: an explicit Unix socket, an explicit address (or
//! `EPHEMERA_ADDR`), then `<data-dir>/endpoints.json` written by a running broker, preferring its
//! Unix socket. Addresses are `unix:///path`, `unix:path`, `https://host:port`,
//! `http://host:port` (plaintext brokers only) or `host:port` (TLS).

pub mod evidence;

use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Uri};

use crate::api::pb::v1::broker_client::BrokerClient;
use crate::endpoints::Endpoints;

/// How long to wait for a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait for a response.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Where a broker is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A Unix socket.
    Socket(PathBuf),
    /// TCP, with TLS unless `plaintext`.
    Tcp {
        /// `https://host:port` or `http://host:port`.
        url: String,
        /// Plaintext (the broker runs with `grpc.insecure_plaintext`).
        plaintext: bool,
    },
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Socket(p) => write!(f, "unix:{}", p.display()),
            Self::Tcp { url, .. } => f.write_str(url),
        }
    }
}

impl Target {
    /// Parses an address as given to `--addr` or `EPHEMERA_ADDR`.
    pub fn parse(addr: &str) -> Result<Self, ClientError> {
        if let Some(path) = addr
            .strip_prefix("unix://")
            .or_else(|| addr.strip_prefix("unix:"))
        {
            if path.is_empty() {
                return Err(ClientError::BadAddress(addr.to_owned()));
            }
            return Ok(Self::Socket(PathBuf::from(path)));
        }
        let (plaintext, url) = if addr.starts_with("https://") {
            (false, addr.to_owned())
        } else if addr.starts_with("http://") {
            (true, addr.to_owned())
        } else if addr.contains("://") {
            return Err(ClientError::BadAddress(addr.to_owned()));
        } else {
            (false, format!("https://{addr}"))
        };
        url.parse::<Uri>()
            .map_err(|_| ClientError::BadAddress(addr.to_owned()))?;
        Ok(Self::Tcp { url, plaintext })
    }
}

/// Why no connection could be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing says where a broker is.
    #[error(
        "no broker found: no --socket or --addr given, EPHEMERA_ADDR is not set, and {} does not exist; start one with `ephemera dev`",
        .0.display()
    )]
    NotFound(PathBuf),
    /// The address could not be understood.
    #[error("invalid broker address {0:?}: use unix:///path, https://host:port or host:port")]
    BadAddress(String),
    /// Nothing answered at the address.
    #[error("no broker at {target}: {reason}; start one with `ephemera dev` or check the address")]
    Unreachable {
        /// Where we looked.
        target: String,
        /// What happened.
        reason: String,
    },
    /// The broker answered, but its TLS certificate was not accepted.
    #[error("TLS with {target} failed: {reason}{hint}")]
    Tls {
        /// Where we connected.
        target: String,
        /// What the TLS library said.
        reason: String,
        /// What to do about it (starts with "; ").
        hint: String,
    },
    /// TLS needs trust anchors that could not be read.
    #[error("cannot read CA bundle {}: {source}; pass --ca-file with the broker's bundle.pem", path.display())]
    CaFile {
        /// The bundle path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// How to find and trust a broker.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// Explicit Unix socket.
    pub socket: Option<PathBuf>,
    /// Explicit address (also from `EPHEMERA_ADDR`).
    pub addr: Option<String>,
    /// Data directory holding `endpoints.json` and `bundle.pem`.
    pub data_dir: PathBuf,
    /// PEM trust anchors for TLS; default: `endpoints.json`'s `ca_bundle`, else
    /// `<data-dir>/bundle.pem`.
    pub ca_file: Option<PathBuf>,
}

impl ConnectOptions {
    /// Resolves where the broker is, and which CA bundle to trust for TLS.
    pub fn resolve(&self) -> Result<(Target, PathBuf), ClientError> {
        let default_ca = self.data_dir.join(crate::ca::keys::BUNDLE);
        if let Some(s) = &self.socket {
            return Ok((Target::Socket(s.clone()), default_ca));
        }
        if let Some(a) = &self.addr {
            return Ok((
                Target::parse(a)?,
                self.ca_file.clone().unwrap_or(default_ca),
            ));
        }
        let endpoints = Endpoints::read(&self.data_dir)
            .map_err(|_| ClientError::NotFound(self.data_dir.join(crate::endpoints::FILE)))?;
        let ca = self.ca_file.clone().unwrap_or(endpoints.ca_bundle);
        if endpoints.broker_socket.exists() {
            return Ok((Target::Socket(endpoints.broker_socket), ca));
        }
        Ok((Target::parse(&endpoints.grpc_addr)?, ca))
    }

    /// Resolves and connects.
    pub async fn connect(&self) -> Result<Channel, ClientError> {
        let (target, ca) = self.resolve()?;
        connect(&target, &ca).await
    }

    /// Resolves, connects and returns a `Broker` client.
    pub async fn broker(&self) -> Result<BrokerClient<Channel>, ClientError> {
        Ok(BrokerClient::new(self.connect().await?))
    }
}

/// Connects to `target`; TLS trusts the PEM bundle at `ca_file`.
pub async fn connect(target: &Target, ca_file: &Path) -> Result<Channel, ClientError> {
    let unreachable = |reason: String| ClientError::Unreachable {
        target: target.to_string(),
        reason,
    };
    match target {
        Target::Socket(path) => {
            if !path.exists() {
                return Err(unreachable("socket does not exist".into()));
            }
            let path = path.clone();
            // The URI is required by tonic but unused: the connector dials the socket.
            Endpoint::from_static("http://ephemera.socket")
                .connect_timeout(CONNECT_TIMEOUT)
                .timeout(REQUEST_TIMEOUT)
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(
                            tokio::net::UnixStream::connect(path).await?,
                        ))
                    }
                }))
                .await
                .map_err(|e| unreachable(error_chain(&e)))
        }
        Target::Tcp { url, plaintext } => {
            if *plaintext && !answers_plaintext_http2(url).await {
                return Err(ClientError::Tls {
                    target: target.to_string(),
                    reason: "the server does not answer plaintext HTTP/2 (it speaks TLS)".into(),
                    hint: format!(
                        "; use {} and --ca-file with the broker's bundle.pem",
                        url.replacen("http://", "https://", 1)
                    ),
                });
            }
            let mut endpoint = Endpoint::from_shared(url.clone())
                .map_err(|_| ClientError::BadAddress(url.clone()))?
                .connect_timeout(CONNECT_TIMEOUT)
                .timeout(REQUEST_TIMEOUT);
            if !plaintext {
                let pem = std::fs::read(ca_file).map_err(|source| ClientError::CaFile {
                    path: ca_file.to_owned(),
                    source,
                })?;
                endpoint = endpoint
                    .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
                    .map_err(|e| unreachable(error_chain(&e)))?;
            }
            match endpoint.connect().await {
                Ok(channel) => Ok(channel),
                Err(e) if !plaintext && is_tls_failure(&e) => {
                    let names = server_names(url).await;
                    Err(ClientError::Tls {
                        target: target.to_string(),
                        reason: error_chain(&e),
                        hint: tls_hint(url, names.as_deref(), ca_file),
                    })
                }
                Err(e) => Err(unreachable(error_chain(&e))),
            }
        }
    }
}

/// Whether a server answers an HTTP/2 preface in plaintext, as a broker with
/// `grpc.insecure_plaintext` does (a TLS listener answers with an alert or closes). Asked only
/// for `http://` addresses; an unreachable address counts as answering, so that connecting
/// reports it as unreachable.
async fn answers_plaintext_http2(url: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let authority = url.trim_start_matches("http://").trim_end_matches('/');
    let Ok(Ok(mut tcp)) =
        tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(authority)).await
    else {
        return true;
    };
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    // An empty SETTINGS frame.
    hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    if tcp.write_all(&hello).await.is_err() {
        return false;
    }
    let mut first = [0u8; 1];
    match tokio::time::timeout(Duration::from_secs(2), tcp.read(&mut first)).await {
        // An HTTP/2 server's first frame is its SETTINGS: a length of under 2^16, so a 0 byte.
        Ok(Ok(1)) => first[0] == 0,
        // Closed, or no answer: not an HTTP/2 server.
        Ok(_) => false,
        Err(_) => false,
    }
}

/// Whether a connection failed in the TLS handshake (the peer answered).
fn is_tls_failure(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.downcast_ref::<rustls::Error>().is_some() {
            return true;
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io
                .get_ref()
                .is_some_and(|inner| inner.is::<rustls::Error>())
        {
            return true;
        }
        cur = err.source();
    }
    let text = error_chain(e);
    text.contains("certificate") || text.contains("HandshakeFailure") || text.contains("tls")
}

/// What to do about a refused certificate: the names it holds against the name dialled, and
/// which trust anchors to use.
fn tls_hint(url: &str, names: Option<&[String]>, ca_file: &Path) -> String {
    let host = url
        .trim_start_matches("https://")
        .rsplit_once(':')
        .map_or(url, |(h, _)| h)
        .trim_matches(['[', ']']);
    let mut hint = String::new();
    match names {
        Some(names) if !names.iter().any(|n| n == host) => hint.push_str(&format!(
            "; the broker's certificate is for {} but {host:?} was dialled: connect to one of \
             those names, or add {host:?} to grpc.server_names and restart the broker",
            names.join(", ")
        )),
        _ => {}
    }
    hint.push_str(&format!(
        "; trust anchors used: {} (pass --ca-file with the broker's bundle.pem, found in its \
         data directory)",
        ca_file.display()
    ));
    hint
}

/// The DNS and IP names in the certificate a TLS server presents, read without trusting it
/// (for an error message only; nothing is sent).
async fn server_names(url: &str) -> Option<Vec<String>> {
    use std::sync::{Arc, Mutex};

    #[derive(Debug)]
    struct Capture(Mutex<Option<Vec<u8>>>, Arc<rustls::crypto::CryptoProvider>);
    impl rustls::client::danger::ServerCertVerifier for Capture {
        fn verify_server_cert(
            &self,
            end_entity: &rustls::pki_types::CertificateDer<'_>,
            _: &[rustls::pki_types::CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            if let Ok(mut slot) = self.0.lock() {
                *slot = Some(end_entity.to_vec());
            }
            Err(rustls::Error::General(
                "certificate read for diagnosis only".into(),
            ))
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Err(rustls::Error::General("diagnosis only".into()))
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Err(rustls::Error::General("diagnosis only".into()))
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.1.signature_verification_algorithms.supported_schemes()
        }
    }

    let authority = url.trim_start_matches("https://").trim_end_matches('/');
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let capture = Arc::new(Capture(Mutex::new(None), provider.clone()));
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .ok()?
        .dangerous()
        .with_custom_certificate_verifier(capture.clone())
        .with_no_client_auth();
    let host = authority
        .rsplit_once(':')
        .map_or(authority, |(h, _)| h)
        .trim_matches(['[', ']'])
        .to_owned();
    let name = rustls::pki_types::ServerName::try_from(host).ok()?;
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(authority))
        .await
        .ok()?
        .ok()?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let _ = tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, tcp)).await;
    let der = capture.0.lock().ok()?.take()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let names = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some((*d).to_owned()),
            x509_parser::extensions::GeneralName::IPAddress(ip) => match ip.len() {
                4 => <[u8; 4]>::try_from(*ip)
                    .ok()
                    .map(|b| std::net::IpAddr::from(b).to_string()),
                16 => <[u8; 16]>::try_from(*ip)
                    .ok()
                    .map(|b| std::net::IpAddr::from(b).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect();
    Some(names)
}

/// An error and its sources on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cur = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        let rows = [
            ("unix:///run/e.sock", Target::Socket("/run/e.sock".into())),
            ("unix:rel.sock", Target::Socket("rel.sock".into())),
            (
                "127.0.0.1:8443",
                Target::Tcp {
                    url: "https://127.0.0.1:8443".into(),
                    plaintext: false,
                },
            ),
            (
                "http://127.0.0.1:1",
                Target::Tcp {
                    url: "http://127.0.0.1:1".into(),
                    plaintext: true,
                },
            ),
        ];
        for (input, want) in rows {
            assert_eq!(Target::parse(input).unwrap(), want, "{input}");
        }
        for bad in ["unix:", "ftp://x:1", "bad host:1"] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn missing_endpoints_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let opts = ConnectOptions {
            data_dir: dir.path().to_owned(),
            ..ConnectOptions::default()
        };
        let err = opts.resolve().unwrap_err().to_string();
        assert!(err.contains("ephemera dev"), "{err}");
    }
}
