//! Audit events: one per decision on `ephemera::audit`, with the decision's fields, and never a
//! token, key or CSR — checked on logs captured at TRACE level.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use base64::Engine;
use common::*;
use ephemera::api::pb::v1::{MintJwtSvidRequest, MintX509SvidRequest};

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn one_event_per_decision_with_fields_and_no_secrets() {
    let capture = Capture::default();
    let writer = capture.clone();
    tracing_subscriber::fmt()
        .json()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .init();

    let cap = "@id(\"jwt-cap\")\npermit (principal, action, resource) when { context.requested_ttl_secs <= 600 };\n";
    let b = start_with_policy(&uid_rule(), cap).await;
    let mut client = b.unix_client().await;
    let token = client
        .mint_jwt_svid(MintJwtSvidRequest {
            audience: vec!["deploy".into()],
            ttl_seconds: Some(120),
            spiffe_id: String::new(),
            task_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    let denied = client
        .mint_jwt_svid(MintJwtSvidRequest {
            audience: vec!["deploy".into()],
            ttl_seconds: Some(3600),
            spiffe_id: String::new(),
            task_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap();
    let x = client
        .mint_x509_svid(MintX509SvidRequest {
            csr: csr.der().to_vec(),
            ttl_seconds: Some(300),
            spiffe_id: String::new(),
            task_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let generated = client
        .mint_x509_svid(MintX509SvidRequest {
            ttl_seconds: Some(300),
            ..MintX509SvidRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    b.running.shutdown().await.unwrap();

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    let audit: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "ephemera::audit")
        .collect();
    assert_eq!(audit.len(), 4, "one event per decision:\n{logs}");
    let allow = &audit[0]["fields"];
    assert_eq!(allow["decision"], "allow");
    assert_eq!(allow["action"], "MintJwtSvid");
    assert_eq!(allow["attestor"], "unix");
    assert_eq!(
        allow["spiffe_id"],
        format!("spiffe://{TD}/uid/{}", my_uid())
    );
    assert_eq!(allow["resource"], "deploy");
    assert_eq!(allow["requested_ttl_secs"], 120);
    assert_eq!(allow["granted_ttl_secs"], 120);
    assert_eq!(allow["policies"], "jwt-cap");
    assert!(allow["decision_id"].as_str().unwrap().len() >= 32);
    let deny = &audit[1]["fields"];
    assert_eq!(deny["decision"], "deny");
    assert_eq!(deny["requested_ttl_secs"], 3600);
    assert!(
        deny["reason"]
            .as_str()
            .unwrap()
            .contains("no policy permits"),
        "{deny}"
    );

    // No token, token part, private key or CSR anywhere in the TRACE-level logs.
    let sig = token.rsplit('.').next().unwrap();
    assert!(!logs.contains(&token));
    assert!(!logs.contains(sig), "token signature leaked");
    let b64 = base64::engine::general_purpose::STANDARD;
    for secret in [
        b64.encode(csr.der()),
        csr.pem().unwrap(),
        key.serialize_pem(),
        b64.encode(&generated.private_key),
    ] {
        let probe: String = secret
            .lines()
            .find(|l| l.len() > 40 && !l.starts_with("-----"))
            .unwrap_or(&secret)
            .chars()
            .take(40)
            .collect();
        assert!(!logs.contains(&probe), "secret material in logs");
    }
    assert!(!x.serial.is_empty());
}
