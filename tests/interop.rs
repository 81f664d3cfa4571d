//! The clients people already run, unmodified, against a real broker: py-spiffe, grpcio
//! (gRPC C-core) and authlib from PyPI, @grpc/grpc-js and jose from npm, openssl, installed from the lockfiles in
//! `tests/interop/` by `tests/interop/setup.sh` (which `.ci/run` also runs). What they report is
//! checked here with our own independent verifiers (rustls-webpki for chains, ring for JWT
//! signatures). A missing Python or Node fails these tests; it never skips them.
//!
//! Also: raw HTTP/2 requests with each `:authority` form gRPC stacks send on Unix sockets
//! (C-core's percent-encoded path, grpc-java's raw path, grpc-go's and grpc-js's `localhost`,
//! none at all) are served, not reset.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::*;
use ephemera::clock::Clock;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const AUDIENCE: &str = "interop";

/// Installs the pinned clients (idempotent, once per test binary) and returns the virtualenv's
/// python.
fn interop_python() -> PathBuf {
    static PYTHON: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PYTHON.get_or_init(install).clone()
}

fn install() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("bash")
        .arg(root.join("tests/interop/setup.sh"))
        .output()
        .expect("bash runs tests/interop/setup.sh");
    assert!(
        out.status.success(),
        "installing the interop clients failed (python3 and npm are required):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    PathBuf::from(stdout.lines().last().unwrap().trim())
}

fn workload_socket(b: &TestBroker) -> PathBuf {
    b.running.endpoints.workload_socket.clone().unwrap()
}

fn run_json(cmd: &mut Command) -> serde_json::Value {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}", String::from_utf8_lossy(&out.stdout));
    })
}

fn der_list(v: &serde_json::Value) -> Vec<Vec<u8>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|c| STANDARD.decode(c.as_str().unwrap()).unwrap())
        .collect()
}

fn services(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn py_spiffe_and_grpcio_work_unmodified_on_both_sockets() {
    let python = interop_python();
    let b = start(&uid_rule()).await;
    let workload = workload_socket(&b);
    let broker = b.socket();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/python_clients.py");
    let jwks_url = format!("{}/keys", b.running.endpoints.http_addr);
    let r = tokio::task::spawn_blocking(move || {
        run_json(
            Command::new(python)
                .arg(script)
                .arg(&broker)
                .arg(&workload)
                .arg(AUDIENCE)
                .arg(jwks_url)
                .env(
                    "SPIFFE_ENDPOINT_SOCKET",
                    format!("unix://{}", workload.display()),
                ),
        )
    })
    .await
    .unwrap();

    // py-spiffe's X.509-SVID verifies, with webpki, against the bundle it was given, and that
    // bundle is the broker's root.
    let me = format!("spiffe://{TD}/uid/{}", my_uid());
    assert_eq!(r["x509"]["spiffe_id"], me.as_str());
    let chain = der_list(&r["x509"]["chain"]);
    let roots = der_list(&r["x509"]["bundle"]);
    assert_eq!(roots, b.running.broker.ca().keys().roots);
    verify_chain(&chain, &roots, b.clock.now());

    // Its JWT-SVID verifies, with ring, against the broker's published JWKS.
    assert_eq!(r["jwt"]["spiffe_id"], me.as_str());
    let (_, jwks) = b.http_get("/keys").await;
    let jwks: serde_json::Value = serde_json::from_str(&jwks).unwrap();
    let (_, claims) = verify_jwt(r["jwt"]["token"].as_str().unwrap(), &jwks);
    assert_eq!(claims["sub"], me.as_str());
    assert!(claims["aud"].to_string().contains(AUDIENCE), "{claims}");

    // openssl agrees: the leaf chains to the bundle, for TLS client use.
    let dir = tempfile::tempdir().unwrap();
    let pem = |der: &[Vec<u8>]| {
        der.iter()
            .map(|d| pem::encode(&pem::Pem::new("CERTIFICATE", d.clone())))
            .collect::<String>()
    };
    std::fs::write(dir.path().join("leaf.pem"), pem(&chain[..1])).unwrap();
    std::fs::write(dir.path().join("chain.pem"), pem(&chain[1..])).unwrap();
    std::fs::write(dir.path().join("roots.pem"), pem(&roots)).unwrap();
    let verified = Command::new("openssl")
        .current_dir(dir.path())
        .args(["verify", "-CAfile", "roots.pem", "-untrusted", "chain.pem"])
        .args(["-purpose", "sslclient", "leaf.pem"])
        .output()
        .expect("openssl runs");
    assert!(
        verified.status.success(),
        "openssl verify: {}{}",
        String::from_utf8_lossy(&verified.stdout),
        String::from_utf8_lossy(&verified.stderr)
    );
    // And authlib verified the JWT-SVID against the broker's JWKS.
    assert_eq!(r["authlib"]["sub"], me.as_str());

    assert_eq!(r["x509_bundle_domains"], serde_json::json!([TD]));
    assert_eq!(r["jwt_bundle_domains"], serde_json::json!([TD]));

    // grpcio (C-core, percent-encoded socket path as :authority) gets health on both sockets,
    // a status for each service served there.
    for (service, status) in r["health"]["broker"].as_object().unwrap() {
        assert_eq!(status, "SERVING", "broker socket, {service:?}");
    }
    assert_eq!(r["health"]["broker"].as_object().unwrap().len(), 4);
    assert_eq!(r["health"]["workload"][""], "SERVING");
    assert_eq!(r["health"]["workload"]["SpiffeWorkloadAPI"], "SERVING");
    assert_eq!(
        r["health"]["workload"]["envoy.service.secret.v3.SecretDiscoveryService"],
        "SERVING"
    );

    // Reflection v1alpha lists exactly what each listener serves.
    let common = [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ];
    let mut want: Vec<String> = common
        .iter()
        .chain(&[
            "ephemera.v1.Admin",
            "ephemera.v1.Broker",
            "ephemera.v1.Revocations",
        ])
        .map(|s| s.to_string())
        .collect();
    want.sort();
    assert_eq!(services(&r["reflection"]["broker"]), want);
    let mut want: Vec<String> = common
        .iter()
        .chain(&[
            "SpiffeWorkloadAPI",
            "envoy.service.secret.v3.SecretDiscoveryService",
        ])
        .map(|s| s.to_string())
        .collect();
    want.sort();
    assert_eq!(services(&r["reflection"]["workload"]), want);
    b.running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn grpc_js_and_jose_work_unmodified_on_the_workload_socket() {
    interop_python();
    let b = start(&uid_rule()).await;
    let (_, discovery) = b.http_get("/.well-known/openid-configuration").await;
    let discovery: serde_json::Value = serde_json::from_str(&discovery).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let workload = workload_socket(&b);
    let mut cmd = Command::new("node");
    cmd.current_dir(root.join("tests/interop"))
        .arg("node_clients.mjs")
        .arg(&workload)
        .arg(root.join("proto/spiffe"))
        .arg(discovery["jwks_uri"].as_str().unwrap())
        .arg(discovery["issuer"].as_str().unwrap())
        .arg(AUDIENCE);
    let r = tokio::task::spawn_blocking(move || run_json(&mut cmd))
        .await
        .unwrap();
    let me = format!("spiffe://{TD}/uid/{}", my_uid());
    assert_eq!(r["spiffe_id"], me.as_str());
    assert_eq!(r["validated_spiffe_id"], me.as_str());
    // jose verified the signature, issuer and audience; check its reading and ours agree.
    assert_eq!(r["jose"]["sub"], me.as_str());
    assert_eq!(r["jose"]["alg"], "ES256");
    let (_, jwks) = b.http_get("/keys").await;
    let jwks: serde_json::Value = serde_json::from_str(&jwks).unwrap();
    let (header, claims) = verify_jwt(r["token"].as_str().unwrap(), &jwks);
    assert_eq!(header["kid"], r["jose"]["kid"]);
    assert_eq!(claims["sub"], me.as_str());
    // Without the security header the Workload API refuses, as the SPIFFE spec requires.
    assert_eq!(r["without_security_header"], "INVALID_ARGUMENT");
    b.running.shutdown().await.unwrap();
}

/// One gRPC call over raw HTTP/2 on a Unix socket with the given `:authority` (or none):
/// returns the response's `grpc-status`, or the error code of a RST_STREAM.
async fn raw_call(
    socket: &Path,
    authority: Option<&str>,
    path: &str,
    extra: &[(&str, &str)],
) -> String {
    let mut s = tokio::net::UnixStream::connect(socket).await.unwrap();
    let mut out = Vec::new();
    out.extend_from_slice(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    out.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]); // empty SETTINGS
    let mut headers: Vec<(&[u8], &[u8])> = vec![
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", path.as_bytes()),
    ];
    if let Some(a) = authority {
        headers.push((b":authority", a.as_bytes()));
    }
    headers.push((b"content-type", b"application/grpc"));
    headers.push((b"te", b"trailers"));
    for (k, v) in extra {
        headers.push((k.as_bytes(), v.as_bytes()));
    }
    let block = loona_hpack::Encoder::new().encode(headers);
    let frame = |out: &mut Vec<u8>, kind: u8, flags: u8, payload: &[u8]| {
        let len = payload.len();
        out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
        out.extend_from_slice(&1u32.to_be_bytes());
        out.extend_from_slice(payload);
    };
    frame(&mut out, 0x1, 0x4, &block); // HEADERS, END_HEADERS
    frame(&mut out, 0x0, 0x1, &[0, 0, 0, 0, 0]); // DATA: an empty message, END_STREAM
    s.write_all(&out).await.unwrap();

    let mut decoder = loona_hpack::Decoder::new();
    let mut buf = Vec::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        while buf.len() >= 9 {
            let len =
                (usize::from(buf[0]) << 16) | (usize::from(buf[1]) << 8) | usize::from(buf[2]);
            if buf.len() < 9 + len {
                break;
            }
            let (kind, stream) = (buf[3], u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]));
            let payload: Vec<u8> = buf[9..9 + len].to_vec();
            buf.drain(..9 + len);
            match (kind, stream) {
                (0x3, 1) => {
                    let code = u32::from_be_bytes(payload[..4].try_into().unwrap());
                    return format!("RST_STREAM {code}");
                }
                (0x1, 1) => {
                    let mut status = None;
                    decoder
                        .decode_with_cb(&payload, |k, v| {
                            if &*k == b"grpc-status" {
                                status = Some(String::from_utf8_lossy(&v).into_owned());
                            }
                        })
                        .unwrap();
                    if let Some(status) = status {
                        return status;
                    }
                }
                (0x7, 0) => return "GOAWAY".into(),
                _ => {}
            }
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline, s.read(&mut chunk))
            .await
            .expect("a response within 10s")
            .unwrap();
        assert!(n > 0, "connection closed without a response");
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test]
async fn every_authority_form_is_served_on_both_unix_sockets() {
    let b = start(&uid_rule()).await;
    let broker = b.socket();
    let workload = workload_socket(&b);
    for socket in [&broker, &workload] {
        let percent = socket
            .display()
            .to_string()
            .trim_start_matches('/')
            .replace('/', "%2F");
        let raw = socket.display().to_string();
        for authority in [
            Some(percent.as_str()),
            Some(raw.as_str()),
            Some("localhost"),
            None,
        ] {
            // grpc.health.v1.Health/Check with an empty request: the whole server.
            let status = raw_call(socket, authority, "/grpc.health.v1.Health/Check", &[]).await;
            assert_eq!(
                status,
                "0",
                "{} with :authority {authority:?}",
                socket.display()
            );
        }
    }
    // A Workload API call with a socket-path authority reaches the service (which then asks for
    // its security header), rather than being reset.
    let raw = workload.display().to_string();
    let status = raw_call(
        &workload,
        Some(&raw),
        "/SpiffeWorkloadAPI/FetchJWTSVID",
        &[],
    )
    .await;
    assert_eq!(
        status, "3",
        "INVALID_ARGUMENT: the security header is missing"
    );
    b.running.shutdown().await.unwrap();
}
