//! OIDC evidence end to end: a test issuer (own keys, JWKS over real HTTP on loopback) drives
//! GitHub-, GitLab- and Kubernetes-shaped tokens through attestation, mapping and policy to
//! minted, independently verified credentials; denied variants; and every bad token with its
//! exact gRPC code.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

mod common;

use std::time::Duration;

use common::oidc::TestIssuer;
use common::*;
use ephemera::api::pb::v1::broker_client::BrokerClient;
use ephemera::api::pb::v1::{MintJwtSvidRequest, MintX509SvidRequest};
use ephemera::clock::Clock;
use serde_json::json;
use tonic::{Code, Request};

const AUD: &str = "https://ephemera.example.org";

fn config(issuer: &TestIssuer) -> String {
    let jwks = issuer.jwks_url();
    format!(
        r#"
[[oidc]]
issuer = "{gh}"
jwks_url = "{jwks}"
audiences = ["{AUD}"]
max_token_age = "10m"
required_claims = {{ repository_owner = "acme" }}

[[oidc]]
issuer = "{gl}"
jwks_url = "{jwks}"
audiences = ["{AUD}"]

[[oidc]]
issuer = "{k8s}"
jwks_url = "{jwks}"
audiences = ["{AUD}"]
algorithms = ["RS256"]

[[mapping]]
attestor = "oidc"
spiffe_id = "spiffe://{{trust_domain}}/gh/{{claims.repository_owner}}/{{claims.environment}}"
match = {{ iss = "{gh}" }}

[[mapping]]
attestor = "oidc"
spiffe_id = "spiffe://{{trust_domain}}/gl/pipeline/{{claims.pipeline_id}}"
match = {{ iss = "{gl}" }}

[[mapping]]
attestor = "oidc"
spiffe_id = 'spiffe://{{trust_domain}}/ns/{{claims."kubernetes.io".namespace}}/sa/{{claims."kubernetes.io".serviceaccount.name}}'
match = {{ iss = "{k8s}" }}
"#,
        gh = issuer.issuer("github"),
        gl = issuer.issuer("gitlab"),
        k8s = issuer.issuer("k8s"),
    )
}

/// GitHub: deploy tokens only from main, environment prod, at most 15 minutes, from loopback,
/// before a deadline. GitLab: only from 10.0.0.0/8. Kubernetes: certificates for namespace prod.
fn policy(issuer: &TestIssuer, deadline: &str) -> String {
    format!(
        r#"
@id("github-deploy")
permit (principal, action == Ephemera::Action::"MintJwtSvid", resource == Ephemera::Audience::"deploy")
when {{
  principal.attestor == "oidc" &&
  principal.hasTag("iss") && principal.getTag("iss") == "{gh}" &&
  principal.hasTag("ref") && principal.getTag("ref") == "refs/heads/main" &&
  principal.hasTag("environment") && principal.getTag("environment") == "prod" &&
  context.requested_ttl_secs <= 900 &&
  context has source_ip && context.source_ip.isInRange(ip("127.0.0.0/8")) &&
  context.now < datetime("{deadline}")
}};

@id("gitlab-from-runners")
permit (principal, action == Ephemera::Action::"MintJwtSvid", resource)
when {{
  principal.hasTag("iss") && principal.getTag("iss") == "{gl}" &&
  context has source_ip && context.source_ip.isInRange(ip("10.0.0.0/8"))
}};

@id("k8s-prod-certs")
permit (principal, action == Ephemera::Action::"MintX509Svid", resource)
when {{
  principal.hasTag("kubernetes.io.namespace") && principal.getTag("kubernetes.io.namespace") == "prod"
}};
"#,
        gh = issuer.issuer("github"),
        gl = issuer.issuer("gitlab"),
    )
}

fn with_token<T>(msg: T, token: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

fn deploy(ttl: Option<u64>) -> MintJwtSvidRequest {
    MintJwtSvidRequest {
        audience: vec!["deploy".into()],
        ttl_seconds: ttl,
        spiffe_id: String::new(),
        task_id: String::new(),
    }
}

fn rfc3339(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .unwrap()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

async fn setup() -> (std::sync::Arc<TestIssuer>, TestBroker) {
    let issuer = TestIssuer::start().await;
    let now = ephemera::clock::unix_secs(std::time::SystemTime::now());
    let b = start_with_policy(&config(&issuer), &policy(&issuer, &rfc3339(now + 3600))).await;
    (issuer, b)
}

#[tokio::test]
async fn github_gitlab_and_kubernetes_tokens_to_verified_credentials() {
    let (issuer, b) = setup().await;
    let mut client = BrokerClient::new(b.tls_channel().await);
    let now = b.clock.unix_now();

    // GitHub Actions, RS256: a deploy JWT-SVID, verified against the broker's JWKS.
    let gh = issuer.rs256(&issuer.github_claims(now, AUD, "refs/heads/main", "prod"));
    let resp = client
        .mint_jwt_svid(with_token(deploy(Some(600)), &gh))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.spiffe_id, format!("spiffe://{TD}/gh/acme/prod"));
    let (_, jwks) = b.http_get("/keys").await;
    let (_, claims) = verify_jwt(&resp.token, &serde_json::from_str(&jwks).unwrap());
    assert_eq!(claims["sub"], resp.spiffe_id);
    assert_eq!(claims["aud"], "deploy");
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        600
    );

    // The same token again: re-attested and re-authorized, still fine.
    client
        .mint_jwt_svid(with_token(deploy(Some(60)), &gh))
        .await
        .unwrap();

    // Kubernetes, RS256 with nested kubernetes.io claims: an X.509-SVID, verified by webpki.
    let k8s = issuer.rs256(&issuer.k8s_claims(now, AUD, "prod"));
    let x = client
        .mint_x509_svid(with_token(MintX509SvidRequest::default(), &k8s))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(x.spiffe_id, format!("spiffe://{TD}/ns/prod/sa/api"));
    verify_chain(&x.cert_chain, &x.bundle, b.clock.now());

    // GitLab, ES256: mapped, but the policy only admits runners from 10.0.0.0/8.
    let gl = issuer.es256(&issuer.gitlab_claims(now, AUD));
    let err = client
        .mint_jwt_svid(with_token(deploy(None), &gl))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::PermissionDenied,
        "source IP outside range"
    );
    b.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn denied_variants() {
    let (issuer, b) = setup().await;
    let mut client = BrokerClient::new(b.tls_channel().await);
    let now = b.clock.unix_now();
    let rows = [
        (
            "wrong branch",
            issuer.rs256(&issuer.github_claims(now, AUD, "refs/heads/dev", "prod")),
            Some(600),
        ),
        (
            "wrong environment",
            issuer.rs256(&issuer.github_claims(now, AUD, "refs/heads/main", "staging")),
            Some(600),
        ),
        (
            "TTL above the policy's cap",
            issuer.rs256(&issuer.github_claims(now, AUD, "refs/heads/main", "prod")),
            Some(901),
        ),
    ];
    for (what, token, ttl) in rows {
        let err = client
            .mint_jwt_svid(with_token(deploy(ttl), &token))
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::PermissionDenied,
            "{what}: {}",
            err.message()
        );
    }
    // Kubernetes token from another namespace: mapped, not permitted.
    let k8s = issuer.rs256(&issuer.k8s_claims(now, AUD, "dev"));
    let err = client
        .mint_x509_svid(with_token(MintX509SvidRequest::default(), &k8s))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // Outside the time window: two hours later, with a fresh token, the deadline has passed.
    b.clock.advance(Duration::from_secs(2 * 3600));
    let later = b.clock.unix_now();
    let token = issuer.rs256(&issuer.github_claims(later, AUD, "refs/heads/main", "prod"));
    let err = client
        .mint_jwt_svid(with_token(deploy(Some(600)), &token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    b.running.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_tokens_get_exact_codes() {
    let (issuer, b) = setup().await;
    let mut client = BrokerClient::new(b.tls_channel().await);
    let now = b.clock.unix_now();
    let good = issuer.github_claims(now, AUD, "refs/heads/main", "prod");
    let with = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut c = good.clone();
        f(&mut c);
        c
    };
    let tampered = {
        let t = issuer.es256(&good);
        let (head, sig) = t.rsplit_once('.').unwrap();
        let mut sig = sig.as_bytes().to_vec();
        sig[5] = if sig[5] == b'A' { b'B' } else { b'A' };
        format!("{head}.{}", String::from_utf8(sig).unwrap())
    };
    let mut many = good.clone();
    for i in 0..200 {
        many[format!("extra{i}")] = json!(i);
    }
    let mut huge = good.clone();
    huge["padding"] = json!("x".repeat(17 * 1024));

    let rows: Vec<(&str, String, Code)> = vec![
        (
            "expired",
            issuer.es256(&with(&|c| {
                c["exp"] = json!(now - 120);
            })),
            Code::Unauthenticated,
        ),
        (
            "not yet valid (nbf)",
            issuer.es256(&with(&|c| {
                c["nbf"] = json!(now + 600);
            })),
            Code::Unauthenticated,
        ),
        (
            "issued too long ago",
            issuer.es256(&with(&|c| {
                c["iat"] = json!(now - 3600);
            })),
            Code::Unauthenticated,
        ),
        (
            // now - iat overflows i64: must not wrap into a young age.
            "issued at the smallest i64",
            issuer.es256(&with(&|c| {
                c["iat"] = json!(i64::MIN);
            })),
            Code::Unauthenticated,
        ),
        (
            "wrong iss",
            issuer.es256(&with(&|c| {
                c["iss"] = json!("https://evil.example.com");
            })),
            Code::Unauthenticated,
        ),
        (
            "wrong aud",
            issuer.es256(&with(&|c| {
                c["aud"] = json!("someone-else");
            })),
            Code::Unauthenticated,
        ),
        (
            "required claim missing",
            issuer.es256(&with(&|c| {
                c["repository_owner"] = json!("evil");
            })),
            Code::Unauthenticated,
        ),
        (
            "unknown kid",
            issuer.sign(&json!({"alg": "ES256", "kid": "nope"}), &good),
            Code::Unauthenticated,
        ),
        (
            "alg none",
            issuer.sign(&json!({"alg": "none", "kid": issuer.es_kid}), &good),
            Code::Unauthenticated,
        ),
        (
            "HS256 keyed with the public key",
            issuer.sign(&json!({"alg": "HS256", "kid": issuer.rsa_kid}), &good),
            Code::Unauthenticated,
        ),
        ("signature tampered", tampered, Code::Unauthenticated),
        (
            "RS256 key used as ES256",
            issuer.sign(&json!({"alg": "ES256", "kid": issuer.rsa_kid}), &good),
            Code::Unauthenticated,
        ),
        ("garbage", "not.a.jwt".to_owned(), Code::Unauthenticated),
        (
            "token over 16 KiB",
            issuer.es256(&huge),
            Code::ResourceExhausted,
        ),
        (
            "more claims than the limit",
            issuer.es256(&many),
            Code::Unauthenticated,
        ),
        (
            "claim injecting / into the SPIFFE ID",
            issuer.es256(&with(&|c| {
                c["environment"] = json!("prod/../../admin");
            })),
            Code::PermissionDenied,
        ),
        (
            "claim injecting .. into the SPIFFE ID",
            issuer.es256(&with(&|c| {
                c["environment"] = json!("..");
            })),
            Code::PermissionDenied,
        ),
    ];
    for (what, token, code) in rows {
        let err = client
            .mint_jwt_svid(with_token(deploy(Some(600)), &token))
            .await
            .expect_err(what);
        assert_eq!(err.code(), code, "{what}: {}", err.message());
        assert!(!err.message().contains(&token), "{what}: token echoed back");
    }
    // Kubernetes issuer allows only RS256: an ES256 token from it is refused.
    let k8s_es = issuer.es256(&issuer.k8s_claims(now, AUD, "prod"));
    let err = client
        .mint_x509_svid(with_token(MintX509SvidRequest::default(), &k8s_es))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("algorithm"), "{}", err.message());

    // Nothing above changed anything: the good token still works.
    client
        .mint_jwt_svid(with_token(deploy(Some(600)), &issuer.es256(&good)))
        .await
        .unwrap();
    b.running.shutdown().await.unwrap();
}

/// A stand-in for the GitHub Actions runner's ID token service: checks the request token and
/// hands out a GitHub-shaped token for the audience asked.
async fn github_runner(issuer: std::sync::Arc<TestIssuer>, now: i64) -> String {
    #[derive(serde::Deserialize)]
    struct Query {
        audience: String,
    }
    let app = axum::Router::new().route(
        "/token",
        axum::routing::get(
            move |headers: axum::http::HeaderMap, q: axum::extract::Query<Query>| {
                let issuer = issuer.clone();
                async move {
                    if headers.get("authorization").and_then(|v| v.to_str().ok())
                        != Some("Bearer runner-secret")
                    {
                        return Err(axum::http::StatusCode::UNAUTHORIZED);
                    }
                    let claims = issuer.github_claims(now, &q.audience, "refs/heads/main", "prod");
                    Ok(axum::Json(
                        json!({ "count": 1, "value": issuer.es256(&claims) }),
                    ))
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "http://{}/token?api-version=2.0",
        listener.local_addr().unwrap()
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    url
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_finds_github_actions_evidence_in_the_environment() {
    let (issuer, b) = setup().await;
    let url = github_runner(issuer.clone(), b.clock.unix_now()).await;
    let token = |runner_secret: &str| {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_ephemera"))
            .args(["token", "--audience", "deploy", "--ttl", "5m", "--addr"])
            .arg(&b.running.endpoints.grpc_addr)
            .arg("--ca-file")
            .arg(&b.running.endpoints.ca_bundle)
            .env("ACTIONS_ID_TOKEN_REQUEST_URL", &url)
            .env("ACTIONS_ID_TOKEN_REQUEST_TOKEN", runner_secret)
            .env("EPHEMERA_OIDC_AUDIENCE", AUD)
            .env_remove("EPHEMERA_ADDR")
            .output()
    };
    let out = token("runner-secret").await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let minted = String::from_utf8(out.stdout).unwrap();
    let (_, jwks) = b.http_get("/keys").await;
    let (_, claims) = verify_jwt(minted.trim(), &serde_json::from_str(&jwks).unwrap());
    assert_eq!(claims["sub"], format!("spiffe://{TD}/gh/acme/prod"));

    // The runner refuses (no `id-token: write`): unavailable, and the error says what to check.
    let out = token("stolen-request-token-7f3a").await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{stderr}");
    assert!(stderr.contains("id-token: write"), "{stderr}");
    assert!(!stderr.contains("stolen-request-token-7f3a"), "{stderr}");
    b.running.shutdown().await.unwrap();
}
