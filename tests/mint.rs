//! Minting through a real broker: X.509-SVIDs and JWT-SVIDs over the Unix socket, verified with
//! code that did not make them, and every rejected input with its exact gRPC code.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use ephemera::api::pb::v1::{MintJwtSvidRequest, MintX509SvidRequest};
use ephemera::ca::keys::InitOptions;
use ephemera::clock::Clock;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, PKCS_ECDSA_P256_SHA256};
use tonic::Code;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

fn csr(params: &CertificateParams, key: &KeyPair) -> Vec<u8> {
    params.serialize_request(key).unwrap().der().to_vec()
}

fn my_id() -> String {
    format!("spiffe://{TD}/uid/{}", my_uid())
}

/// Asserts every SPIFFE X509-SVID rule on a parsed leaf.
fn assert_spiffe_leaf(der: &[u8], spiffe_id: &str, minted_at: SystemTime) {
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).unwrap();
    let san = cert
        .subject_alternative_name()
        .unwrap()
        .expect("SAN present");
    assert_eq!(
        san.value.general_names,
        vec![GeneralName::URI(spiffe_id)],
        "exactly one SAN, the SPIFFE ID URI"
    );
    let bc = cert
        .basic_constraints()
        .unwrap()
        .expect("basicConstraints present");
    assert!(!bc.value.ca, "CA:FALSE");
    let ku = cert.key_usage().unwrap().expect("keyUsage present");
    assert!(ku.critical, "keyUsage is critical");
    assert!(ku.value.digital_signature());
    assert!(!ku.value.key_cert_sign() && !ku.value.crl_sign());
    assert_eq!(ku.value.flags, 1, "digitalSignature only");
    let eku = cert.extended_key_usage().unwrap().expect("EKU present");
    assert!(eku.value.server_auth && eku.value.client_auth);
    assert_eq!(cert.raw_serial().len(), 16, "128-bit serial");
    let not_before = cert.validity().not_before.timestamp();
    let minted = minted_at.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    assert!(
        (minted - 60..=minted - 5).contains(&not_before),
        "notBefore backdated a few seconds: {not_before} vs {minted}"
    );
    let crl_dp = cert
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::CRLDistributionPoints(p) => Some(p.clone()),
            _ => None,
        })
        .expect("CRL distribution point");
    let dp = format!("{:?}", crl_dp);
    assert!(dp.contains("/crl"), "{dp}");
}

#[tokio::test]
async fn x509_svid_from_csr_verifies_and_follows_the_spiffe_rules() {
    let b = start(&uid_rule()).await;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    // The CSR asks for extra SANs and its own subject: none of it may reach the certificate.
    let mut params = CertificateParams::new(vec!["evil.example.com".to_owned()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "admin");
    let resp = b
        .unix_client()
        .await
        .mint_x509_svid(MintX509SvidRequest {
            csr: csr(&params, &key),
            ttl_seconds: Some(600),
            spiffe_id: String::new(),
            task_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.spiffe_id, my_id());
    assert!(resp.private_key.is_empty(), "no key returned for a CSR");
    assert_eq!(resp.cert_chain.len(), 2, "leaf + intermediate");
    let now = b.clock.now();
    assert_eq!(resp.expires_at, unix(now) + 600);

    let (status, body) = b.http_get("/bundle").await;
    assert_eq!(status, 200);
    let bundle: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(bundle["spiffe_sequence"].as_u64().is_some());
    assert!(bundle["spiffe_refresh_hint"].as_u64().is_some());
    let roots = bundle_roots(&bundle);
    assert_eq!(roots, resp.bundle, "response bundle = served bundle");
    verify_chain(&resp.cert_chain, &roots, now);
    assert_spiffe_leaf(&resp.cert_chain[0], &my_id(), now);

    let (_, leaf) =
        x509_parser::certificate::X509Certificate::from_der(&resp.cert_chain[0]).unwrap();
    assert_eq!(
        leaf.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw(),
        "certificate carries the CSR's key"
    );
    assert!(
        !format!("{}", leaf.subject()).contains("admin"),
        "CSR subject not copied"
    );
    assert_eq!(
        hex(leaf.raw_serial()),
        resp.serial,
        "response states the real serial"
    );
    assert_eq!(leaf.validity().not_after.timestamp(), resp.expires_at);
    b.running.shutdown().await.unwrap();
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

#[tokio::test]
async fn x509_svid_with_broker_generated_key() {
    let b = start(&uid_rule()).await;
    let resp = b
        .unix_client()
        .await
        .mint_x509_svid(MintX509SvidRequest::default())
        .await
        .unwrap()
        .into_inner();
    let now = b.clock.now();
    // Default lifetime (1h) when none is asked for.
    assert_eq!(resp.expires_at, unix(now) + 3600);
    verify_chain(&resp.cert_chain, &resp.bundle, now);
    assert_spiffe_leaf(&resp.cert_chain[0], &my_id(), now);
    // The returned key is the certificate's key: sign with it, verify with the cert's SPKI.
    let rng = ring::rand::SystemRandom::new();
    let key = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        &resp.private_key,
        &rng,
    )
    .expect("private key is PKCS#8 P-256");
    let sig = key.sign(&rng, b"proof").unwrap();
    let (_, leaf) =
        x509_parser::certificate::X509Certificate::from_der(&resp.cert_chain[0]).unwrap();
    ring::signature::UnparsedPublicKey::new(
        &ring::signature::ECDSA_P256_SHA256_ASN1,
        leaf.public_key().subject_public_key.data.as_ref(),
    )
    .verify(b"proof", sig.as_ref())
    .unwrap();
    b.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn jwt_svid_verifies_against_served_jwks() {
    let b = start(&uid_rule()).await;
    let resp = b
        .unix_client()
        .await
        .mint_jwt_svid(MintJwtSvidRequest {
            audience: vec!["https://deploy.example.org".into(), "vault".into()],
            ttl_seconds: Some(120),
            spiffe_id: String::new(),
            task_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let (status, discovery) = b.http_get("/.well-known/openid-configuration").await;
    assert_eq!(status, 200);
    let discovery: serde_json::Value = serde_json::from_str(&discovery).unwrap();
    let base = &b.running.endpoints.http_addr;
    assert_eq!(discovery["jwks_uri"], format!("{base}/keys"));
    let (status, jwks) = b.http_get("/keys").await;
    assert_eq!(status, 200);
    let jwks: serde_json::Value = serde_json::from_str(&jwks).unwrap();
    let (header, claims) = verify_jwt(&resp.token, &jwks);
    assert_eq!(header["alg"], "ES256");
    assert_eq!(header["typ"], "JWT");
    assert_eq!(claims["sub"], my_id());
    assert_eq!(
        claims["aud"],
        serde_json::json!(["https://deploy.example.org", "vault"])
    );
    let iat = claims["iat"].as_i64().unwrap();
    assert_eq!(iat, unix(b.clock.now()));
    assert_eq!(claims["exp"].as_i64().unwrap(), iat + 120);
    assert_eq!(resp.expires_at, iat + 120);
    assert_eq!(claims["jti"], resp.jti.as_str());
    assert_eq!(claims["iss"], discovery["issuer"]);
    // The SPIFFE bundle publishes the same JWT key.
    let (_, bundle) = b.http_get("/bundle").await;
    let bundle: serde_json::Value = serde_json::from_str(&bundle).unwrap();
    let jwt_key = bundle["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["use"] == "jwt-svid")
        .unwrap();
    assert_eq!(jwt_key["kid"], header["kid"]);
    b.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn ttl_is_clamped_to_the_maximum_and_the_ca_expiry() {
    let rule = format!(
        "{}\n[x509_svid]\nmax_ttl = \"24h\"\n[jwt_svid]\nmax_ttl = \"10m\"\n",
        uid_rule()
    );
    // An intermediate that expires in 2 hours caps every certificate.
    let b = start_with(
        &rule,
        InitOptions {
            intermediate_ttl: Duration::from_secs(7200),
            ..InitOptions::default()
        },
    )
    .await;
    let mut client = b.unix_client().await;
    let now = unix(b.clock.now());
    let x = client
        .mint_x509_svid(MintX509SvidRequest {
            ttl_seconds: Some(48 * 3600),
            ..MintX509SvidRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (_, inter) = x509_parser::certificate::X509Certificate::from_der(&x.cert_chain[1]).unwrap();
    assert_eq!(x.expires_at, inter.validity().not_after.timestamp());
    assert!(x.expires_at <= now + 7200);
    let j = client
        .mint_jwt_svid(MintJwtSvidRequest {
            audience: vec!["a".into()],
            ttl_seconds: Some(3600),
            spiffe_id: String::new(),
            task_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(j.expires_at, now + 600, "clamped to jwt_svid.max_ttl");
    // Operators see it coming: /readyz says so (still ready), /metrics has the coverage.
    let (status, body) = b.http_get("/readyz").await;
    assert_eq!(status, 200);
    assert!(
        body.starts_with("ready; warning: the intermediate CA ends in 0 days"),
        "{body}"
    );
    assert!(body.contains("new certificates are cut short"), "{body}");
    let (_, metrics) = b.http_get("/metrics").await;
    let coverage: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("ephemera_intermediate_coverage_seconds "))
        .expect("the coverage gauge")
        .trim()
        .parse()
        .unwrap();
    assert!(
        (-24.0 * 3600.0..-20.0 * 3600.0).contains(&coverage),
        "{coverage}"
    );
    // Past its end, the broker is not ready: it cannot mint X.509-SVIDs.
    b.clock.advance(Duration::from_secs(7300));
    let (status, body) = b.http_get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("the intermediate CA has expired"), "{body}");
    b.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn rejected_inputs_get_exact_codes() {
    let b = start(&uid_rule()).await;
    let mut client = b.unix_client().await;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let good = csr(&CertificateParams::default(), &key);
    let mut bad_sig = good.clone();
    let n = bad_sig.len();
    bad_sig[n - 1] ^= 1;
    let mut ca_params = CertificateParams::default();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_csr = csr(&ca_params, &key);

    let x509_rows: Vec<(&str, MintX509SvidRequest, Code)> = vec![
        (
            "malformed CSR",
            x509(b"garbage".to_vec(), None),
            Code::InvalidArgument,
        ),
        (
            "CSR with a bad signature",
            x509(bad_sig, None),
            Code::InvalidArgument,
        ),
        (
            "CSR asking for CA",
            x509(ca_csr, None),
            Code::InvalidArgument,
        ),
        (
            "CSR over 16 KiB",
            x509(vec![0x30; 16 * 1024 + 1], None),
            Code::ResourceExhausted,
        ),
        (
            "TTL zero",
            x509(good.clone(), Some(0)),
            Code::InvalidArgument,
        ),
        (
            "TTL over the maximum",
            x509(good.clone(), Some(31 * 86_400)),
            Code::InvalidArgument,
        ),
        (
            "someone else's SPIFFE ID",
            MintX509SvidRequest {
                spiffe_id: format!("spiffe://{TD}/admin"),
                ..x509(good.clone(), None)
            },
            Code::PermissionDenied,
        ),
        (
            "invalid SPIFFE ID",
            MintX509SvidRequest {
                spiffe_id: "spiffe://x/../y".into(),
                ..x509(good.clone(), None)
            },
            Code::InvalidArgument,
        ),
    ];
    for (what, req, code) in x509_rows {
        let err = client.mint_x509_svid(req).await.expect_err(what);
        assert_eq!(err.code(), code, "{what}: {}", err.message());
        assert!(!err.message().is_empty(), "{what}: has a message");
    }

    let many: Vec<String> = (0..17).map(|i| format!("aud{i}")).collect();
    let jwt_rows: Vec<(&str, Vec<String>, Option<u64>, Code)> = vec![
        ("no audience", vec![], None, Code::InvalidArgument),
        ("too many audiences", many, None, Code::InvalidArgument),
        (
            "over-long audience",
            vec!["a".repeat(257)],
            None,
            Code::InvalidArgument,
        ),
        (
            "audience with space",
            vec!["a b".into()],
            None,
            Code::InvalidArgument,
        ),
        ("TTL zero", vec!["a".into()], Some(0), Code::InvalidArgument),
        (
            "TTL over the maximum",
            vec!["a".into()],
            Some(u64::MAX),
            Code::InvalidArgument,
        ),
    ];
    for (what, audience, ttl, code) in jwt_rows {
        let err = client
            .mint_jwt_svid(MintJwtSvidRequest {
                audience,
                ttl_seconds: ttl,
                spiffe_id: String::new(),
                task_id: String::new(),
            })
            .await
            .expect_err(what);
        assert_eq!(err.code(), code, "{what}: {}", err.message());
    }
    // Nothing above changed what a good request gets.
    assert!(client.mint_x509_svid(x509(good, None)).await.is_ok());
    b.running.shutdown().await.unwrap();
}

fn x509(csr: Vec<u8>, ttl: Option<u64>) -> MintX509SvidRequest {
    MintX509SvidRequest {
        csr,
        ttl_seconds: ttl,
        spiffe_id: String::new(),
        task_id: String::new(),
    }
}

#[tokio::test]
async fn unmapped_and_unattested_callers_are_refused() {
    // A rule for someone else: this process has no identity.
    let other = my_uid().wrapping_add(1);
    let b = start(&format!(
        "[[mapping]]\nattestor = \"unix\"\nspiffe_id = \"spiffe://{TD}/uid/{{claims.uid}}\"\nmatch = {{ uid = {other} }}\n"
    ))
    .await;
    let err = b
        .unix_client()
        .await
        .mint_jwt_svid(MintJwtSvidRequest {
            audience: vec!["a".into()],
            ..MintJwtSvidRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(
        err.message(),
        "no identity mapping: no mapping rule gives an identity to this caller, attested by `unix`"
    );

    // Over TCP there is no peer credential: no evidence at all.
    let mut tcp = ephemera::api::pb::v1::broker_client::BrokerClient::new(b.tls_channel().await);
    let err = tcp
        .mint_x509_svid(MintX509SvidRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    b.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn claim_that_would_inject_path_segments_is_refused() {
    // exe_path is "/.../ephemera-..." : full of '/', which must never become path segments.
    let b = start(&format!(
        "[[mapping]]\nattestor = \"unix\"\nspiffe_id = \"spiffe://{TD}/exe/{{claims.exe_path}}\"\n"
    ))
    .await;
    let err = b
        .unix_client()
        .await
        .mint_x509_svid(MintX509SvidRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    b.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn tls_health_reflection_and_http_probes() {
    let b = start(&uid_rule()).await;
    let channel = b.tls_channel().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "ephemera.v1.Broker".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut reflection = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection response");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"ephemera.v1.Broker".to_owned()),
        "{names:?}"
    );
    assert!(
        names.contains(&"grpc.health.v1.Health".to_owned()),
        "{names:?}"
    );

    assert_eq!(b.http_get("/livez").await.0, 200);
    assert_eq!(b.http_get("/readyz").await.0, 200);
    assert_eq!(b.http_get("/nope").await.0, 404);
    b.running.shutdown().await.unwrap();
}
