//! Shared harness: a real broker on loopback TCP and a temp Unix socket, with a manual clock, and
//! independent checkers (HTTP by hand, rustls-webpki and x509-parser for certificates, ring for
//! JWT signatures).
#![allow(
    dead_code,
    reason = "each test binary uses a different part of the harness"
)]

pub mod oidc;
pub mod sds;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ephemera::api::pb::v1::broker_client::BrokerClient;
use ephemera::app::{self, Running};
use ephemera::ca::keys::{self, InitOptions};
use ephemera::client::{ConnectOptions, Target};
use ephemera::clock::{Clock, ManualClock};
use ephemera::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

pub const TD: &str = "example.org";

/// The uid of this test process: the identity the default mapping gives it.
pub fn my_uid() -> u32 {
    std::fs::metadata("/proc/self").unwrap().uid()
}

/// Real time that only moves forward: the wall time at creation plus the monotonic time since.
/// For tests that run on real time for minutes, so a step of the machine's wall clock (or a
/// paused VM) cannot make their deadlines and the broker's disagree.
#[derive(Debug, Clone, Copy)]
pub struct SteadyClock {
    wall: SystemTime,
    start: std::time::Instant,
}

impl SteadyClock {
    pub fn new() -> Self {
        Self {
            wall: SystemTime::now(),
            start: std::time::Instant::now(),
        }
    }
}

impl Clock for SteadyClock {
    fn now(&self) -> SystemTime {
        self.wall + self.start.elapsed()
    }
}

pub struct TestBroker {
    pub running: Running,
    pub dir: tempfile::TempDir,
    pub clock: ManualClock,
}

/// Config text for a test broker in `dir`, mapping this process's uid, plus `extra`.
pub fn config_text(dir: &Path, extra: &str) -> String {
    config_text_with(dir, "", extra)
}

/// Config text with `grpc_http` (keys of the `[grpc]` table, then optionally an `[http]` table
/// header and its keys) and `extra` (further tables).
pub fn config_text_with(dir: &Path, grpc_http: &str, extra: &str) -> String {
    let http = if grpc_http.contains("[http]") {
        ""
    } else {
        "[http]\n"
    };
    format!(
        r#"
trust_domain = "{TD}"
data_dir = "{dir}"
[grpc]
listen = "127.0.0.1:0"
socket = "{dir}/broker.sock"
{grpc_http}
{http}listen = "127.0.0.1:0"
{extra}
"#,
        dir = dir.display()
    )
}

/// The mapping rule giving this process `spiffe://example.org/uid/<uid>`.
pub fn uid_rule() -> String {
    format!(
        "[[mapping]]\nattestor = \"unix\"\nspiffe_id = \"spiffe://{{trust_domain}}/uid/{{claims.uid}}\"\nmatch = {{ uid = {} }}\n",
        my_uid()
    )
}

pub async fn start(extra: &str) -> TestBroker {
    start_with(extra, InitOptions::default()).await
}

/// A policy permitting everything: identity mapping alone decides.
pub const ALLOW_ALL: &str = "@id(\"allow-all\")\npermit (principal, action, resource);\n";

pub async fn start_with(extra: &str, ca: InitOptions) -> TestBroker {
    start_full(extra, ca, ALLOW_ALL).await
}

pub async fn start_with_policy(extra: &str, policy: &str) -> TestBroker {
    start_full(extra, InitOptions::default(), policy).await
}

/// The broker's policy file (`<data>/policies/test.cedar`).
pub fn policy_file(b: &TestBroker) -> PathBuf {
    b.dir.path().join("policies").join("test.cedar")
}

pub async fn start_full(extra: &str, ca: InitOptions, policy: &str) -> TestBroker {
    start_in(tempfile::tempdir().unwrap(), extra, ca, policy).await
}

/// A test broker whose data directory is `dir`.
pub async fn start_in(
    dir: tempfile::TempDir,
    extra: &str,
    ca: InitOptions,
    policy: &str,
) -> TestBroker {
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    std::fs::write(dir.path().join("policies").join("test.cedar"), policy).unwrap();
    let clock = ManualClock::new(SystemTime::now());
    let td = TD.parse().unwrap();
    keys::init(dir.path(), &td, ca, SystemTime::now()).unwrap();
    ephemera::api::admin::create_token_file(&dir.path().join("admin.token")).unwrap();
    let (grpc_http, extra) = extra
        .split_once("\n#end-grpc-http\n")
        .unwrap_or(("", extra));
    let config = Config::from_toml(
        &config_text_with(dir.path(), grpc_http, extra),
        Path::new("/"),
    )
    .unwrap();
    let running = app::start(config, Arc::new(clock.clone())).await.unwrap();
    TestBroker {
        running,
        dir,
        clock,
    }
}

impl TestBroker {
    pub fn socket(&self) -> PathBuf {
        self.running.endpoints.broker_socket.clone()
    }

    pub async fn unix_client(&self) -> BrokerClient<Channel> {
        ConnectOptions {
            socket: Some(self.socket()),
            ..ConnectOptions::default()
        }
        .broker()
        .await
        .unwrap()
    }

    /// A channel over the Unix socket (for the services besides `Broker`).
    pub async fn unix_client_channel(&self) -> Channel {
        ConnectOptions {
            socket: Some(self.socket()),
            ..ConnectOptions::default()
        }
        .connect()
        .await
        .unwrap()
    }

    /// The admin token of this broker.
    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("admin.token"))
            .unwrap()
            .trim()
            .to_owned()
    }

    pub async fn tls_channel(&self) -> Channel {
        let target = Target::parse(&self.running.endpoints.grpc_addr).unwrap();
        ephemera::client::connect(&target, &self.running.endpoints.ca_bundle)
            .await
            .unwrap()
    }

    pub async fn http_get(&self, path: &str) -> (u16, String) {
        http_get(&self.running.endpoints.http_addr, path).await
    }
}

/// A TLS connection to the broker's gRPC listener, the server verified by rustls against
/// `roots` for the name `localhost`.
pub async fn tls_handshake(
    b: &TestBroker,
    roots: &[Vec<u8>],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store
            .add(rustls::pki_types::CertificateDer::from(r.clone()))
            .unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(store)
    .with_no_client_auth();
    let addr = b
        .running
        .endpoints
        .grpc_addr
        .trim_start_matches("https://")
        .to_owned();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .expect("the TLS handshake completes and the serving certificate verifies")
}

/// The certificate chain (DER, leaf first) the broker's TLS listener serves on a fresh
/// handshake, verified against `roots`.
pub async fn serving_chain(b: &TestBroker, roots: &[Vec<u8>]) -> Vec<Vec<u8>> {
    tls_handshake(b, roots)
        .await
        .get_ref()
        .1
        .peer_certificates()
        .unwrap()
        .iter()
        .map(|c| c.to_vec())
        .collect()
}

/// A minimal HTTP/1.1 GET, independent of the server's HTTP stack.
pub async fn http_get(base: &str, path: &str) -> (u16, String) {
    let (status, body) = http_get_bytes(base, path).await;
    (status, String::from_utf8(body).unwrap())
}

/// A minimal HTTP/1.1 form POST.
pub async fn http_post_form(base: &str, path: &str, body: &str) -> (u16, String) {
    let host = base.strip_prefix("http://").unwrap();
    let mut s = tokio::net::TcpStream::connect(host).await.unwrap();
    s.write_all(
        format!(
            "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8(buf).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    (
        head.split(' ').nth(1).unwrap().parse().unwrap(),
        body.to_owned(),
    )
}

/// A minimal HTTP/1.1 GET returning the raw body bytes.
pub async fn http_get_bytes(base: &str, path: &str) -> (u16, Vec<u8>) {
    let host = base.strip_prefix("http://").unwrap();
    let mut s = tokio::net::TcpStream::connect(host).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let split = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    (
        head.split(' ').nth(1).unwrap().parse().unwrap(),
        buf[split + 4..].to_vec(),
    )
}

/// Checks `chain` against `roots` and a DER CRL with rustls-webpki's own revocation checking.
pub fn check_with_crl(
    chain: &[Vec<u8>],
    roots: &[Vec<u8>],
    crl_der: &[u8],
    at: SystemTime,
) -> Result<(), webpki::Error> {
    let root_ders: Vec<pki_types::CertificateDer<'_>> =
        roots.iter().map(|r| r.as_slice().into()).collect();
    let anchors: Vec<_> = root_ders
        .iter()
        .map(|r| webpki::anchor_from_trusted_cert(r).unwrap())
        .collect();
    let leaf: pki_types::CertificateDer<'_> = chain[0].as_slice().into();
    let intermediates: Vec<pki_types::CertificateDer<'_>> =
        chain[1..].iter().map(|c| c.as_slice().into()).collect();
    let crl: webpki::CertRevocationList<'_> =
        webpki::BorrowedCertRevocationList::from_der(crl_der)?.into();
    let crls = [&crl];
    let revocation = webpki::RevocationOptionsBuilder::new(&crls)
        .unwrap()
        .with_depth(webpki::RevocationCheckDepth::EndEntity)
        .with_status_policy(webpki::UnknownStatusPolicy::Deny)
        .build();
    let ee = webpki::EndEntityCert::try_from(&leaf).unwrap();
    let time =
        pki_types::UnixTime::since_unix_epoch(at.duration_since(SystemTime::UNIX_EPOCH).unwrap());
    ee.verify_for_usage(
        &[webpki::ring::ECDSA_P256_SHA256],
        &anchors,
        &intermediates,
        time,
        webpki::KeyUsage::client_auth(),
        Some(revocation),
        None,
    )
    .map(|_| ())
}

/// The x509-svid trust anchors (DER) from a SPIFFE bundle document.
pub fn bundle_roots(bundle: &serde_json::Value) -> Vec<Vec<u8>> {
    bundle["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["use"] == "x509-svid")
        .map(|k| STANDARD.decode(k["x5c"][0].as_str().unwrap()).unwrap())
        .collect()
}

/// Verifies `chain` (leaf first) against `roots` with rustls-webpki for both TLS usages.
pub fn verify_chain(chain: &[Vec<u8>], roots: &[Vec<u8>], at: SystemTime) {
    let root_ders: Vec<pki_types::CertificateDer<'_>> =
        roots.iter().map(|r| r.as_slice().into()).collect();
    let anchors: Vec<_> = root_ders
        .iter()
        .map(|r| webpki::anchor_from_trusted_cert(r).unwrap())
        .collect();
    let leaf: pki_types::CertificateDer<'_> = chain[0].as_slice().into();
    let intermediates: Vec<pki_types::CertificateDer<'_>> =
        chain[1..].iter().map(|c| c.as_slice().into()).collect();
    let ee = webpki::EndEntityCert::try_from(&leaf).unwrap();
    let time =
        pki_types::UnixTime::since_unix_epoch(at.duration_since(SystemTime::UNIX_EPOCH).unwrap());
    let algs = &[webpki::ring::ECDSA_P256_SHA256];
    for usage in [
        webpki::KeyUsage::client_auth(),
        webpki::KeyUsage::server_auth(),
    ] {
        ee.verify_for_usage(algs, &anchors, &intermediates, time, usage, None, None)
            .expect("chain verifies with rustls-webpki");
    }
}

/// Verifies a compact JWS with ring against a JWKS document; returns (header, claims).
pub fn verify_jwt(token: &str, jwks: &serde_json::Value) -> (serde_json::Value, serde_json::Value) {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "compact JWS has three parts");
    let header: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
    let claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    let kid = header["kid"].as_str().expect("kid in header");
    let key = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == kid)
        .expect("kid is in the JWKS");
    assert_eq!(key["kty"], "EC");
    assert_eq!(key["crv"], "P-256");
    let mut point = vec![4u8];
    point.extend(URL_SAFE_NO_PAD.decode(key["x"].as_str().unwrap()).unwrap());
    point.extend(URL_SAFE_NO_PAD.decode(key["y"].as_str().unwrap()).unwrap());
    let signed = format!("{}.{}", parts[0], parts[1]);
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_FIXED, point)
        .verify(
            signed.as_bytes(),
            &URL_SAFE_NO_PAD.decode(parts[2]).unwrap(),
        )
        .expect("JWT signature verifies with ring");
    (header, claims)
}

/// The id the broker gives a key: the RFC 7638 thumbprint of its EC public key, computed here
/// from the certificate with x509-parser.
pub fn key_id(cert: &[u8]) -> String {
    let (_, c) = x509_parser::parse_x509_certificate(cert).unwrap();
    let point = &c.public_key().subject_public_key.data;
    let canonical = format!(
        r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
        URL_SAFE_NO_PAD.encode(&point[1..33]),
        URL_SAFE_NO_PAD.encode(&point[33..65])
    );
    URL_SAFE_NO_PAD.encode(ring::digest::digest(
        &ring::digest::SHA256,
        canonical.as_bytes(),
    ))
}

/// The default SVID's chain (DER, leaf first) and the trust domain's authorities (DER) of an
/// X.509 context the `spiffe` crate received.
pub fn context_chain_and_roots(c: &spiffe::X509Context) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let chain = c
        .default_svid()
        .unwrap()
        .cert_chain()
        .iter()
        .map(|c| c.as_bytes().to_vec())
        .collect();
    let roots = c
        .bundle_set()
        .get(&spiffe::TrustDomain::new(TD).unwrap())
        .unwrap()
        .authorities()
        .iter()
        .map(|a| a.as_bytes().to_vec())
        .collect();
    (chain, roots)
}

/// Waits (at most 5 s) for a Workload API stream to deliver an SVID signed by another
/// intermediate than `intermediate` (a key id); its chain and the bundle it came with.
pub async fn replacement_not_under<S, E>(
    contexts: &mut S,
    intermediate: &str,
) -> (Vec<Vec<u8>>, Vec<Vec<u8>>)
where
    S: tokio_stream::Stream<Item = Result<spiffe::X509Context, E>> + Unpin,
    E: std::fmt::Debug,
{
    use tokio_stream::StreamExt;
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let c = contexts.next().await.unwrap().unwrap();
            let (chain, roots) = context_chain_and_roots(&c);
            if key_id(&chain[1]) != intermediate {
                return (chain, roots);
            }
        }
    })
    .await
    .expect("a replacement from another intermediate within 5s")
}

/// RFC 7662 introspection over HTTP.
pub async fn introspect_http(b: &TestBroker, token: &str) -> serde_json::Value {
    let (status, body) = http_post_form(
        &b.running.endpoints.http_addr,
        "/introspect",
        &format!("token={token}"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Lowercase hex, written here rather than taken from the crate so that serials are checked
/// against an independent rendering.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|x| format!("{x:02x}")).collect()
}

/// Waits (bounded) until the served CRL lists `serial`.
pub async fn crl_listing(b: &TestBroker, serial: &str) -> Vec<u8> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (status, der) = http_get_bytes(&b.running.endpoints.http_addr, "/crl").await;
        assert_eq!(status, 200);
        let (_, crl) = x509_parser::parse_x509_crl(&der).unwrap();
        if crl
            .iter_revoked_certificates()
            .any(|r| hex(r.raw_serial()) == serial)
        {
            return der;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "serial {serial} not in /crl within 5s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

pub fn secs(d: Duration) -> i64 {
    d.as_secs() as i64
}
