//! A CI deploy end to end: a local OIDC issuer stands in for GitHub Actions, a job presents its
//! CI-shaped ID token, begins a task, gets a deploy credential, deploys, ends the task — and the
//! credential is refused at introspection the moment the job is over. A job from another branch
//! gets nothing.
//!
//! ```text
//! cargo run --example ci_deploy
//! ```
//!
//! Everything runs in this process on loopback: the issuer (ES256 keys, JWKS over HTTP), an
//! embedded broker trusting it, and the relying party (the deploy target) checking tokens.
#![allow(clippy::print_stdout, reason = "an example narrates what it does")]

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail, ensure};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ephemera::api::pb::v1::broker_client::BrokerClient;
use ephemera::api::pb::v1::revocations_client::RevocationsClient;
use ephemera::api::pb::v1::{
    BeginTaskRequest, EndTaskRequest, IntrospectRequest, MintJwtSvidRequest,
};
use ephemera::client::ConnectOptions;
use ephemera::client::evidence::{Evidence, Source};
use ephemera::dev::DevOptions;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde_json::json;

/// The audience CI tokens are minted for (what the broker expects).
const CI_AUDIENCE: &str = "ephemera";
/// The deploy target: the audience of the deploy credential.
const DEPLOY_AUDIENCE: &str = "deploy.example.com";

/// Cedar: deploy credentials only for jobs on main in the prod environment, in a task, for at
/// most 15 minutes.
const POLICY: &str = r#"
@id("ci-deploy-from-main")
permit (
  principal,
  action in [Ephemera::Action::"BeginTask", Ephemera::Action::"MintJwtSvid"],
  resource
)
when {
  principal.attestor == "oidc" &&
  principal.hasTag("ref") && principal.getTag("ref") == "refs/heads/main" &&
  principal.hasTag("environment") && principal.getTag("environment") == "prod" &&
  context.requested_ttl_secs <= 900
};
"#;

/// A stand-in for a CI provider's OIDC issuer.
struct Issuer {
    url: String,
    key: EcdsaKeyPair,
}

impl Issuer {
    async fn start() -> anyhow::Result<Self> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| anyhow::anyhow!("generating the issuer key"))?;
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .map_err(|_| anyhow::anyhow!("loading the issuer key"))?;
        let point = key.public_key().as_ref();
        let jwks = json!({"keys": [{
            "kty": "EC", "crv": "P-256", "kid": "ci-1", "use": "sig", "alg": "ES256",
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..]),
        }]})
        .to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let app = axum::Router::new().route(
            "/jwks",
            axum::routing::get(move || {
                let jwks = jwks.clone();
                async move {
                    (
                        [(axum::http::header::CONTENT_TYPE, "application/json")],
                        jwks,
                    )
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(Self { url, key })
    }

    /// A GitHub-Actions-shaped ID token for a job on `git_ref`.
    fn job_token(&self, git_ref: &str) -> anyhow::Result<String> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
        let header = json!({"alg": "ES256", "typ": "JWT", "kid": "ci-1"});
        let claims = json!({
            "iss": self.url, "aud": CI_AUDIENCE,
            "sub": "repo:acme/shop:environment:prod",
            "repository": "acme/shop", "repository_owner": "acme",
            "ref": git_ref, "environment": "prod",
            "run_id": "8812", "iat": now, "nbf": now, "exp": now + 300,
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = self
            .key
            .sign(&SystemRandom::new(), signing_input.as_bytes())
            .map_err(|_| anyhow::anyhow!("signing the job token"))?;
        Ok(format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig)))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let issuer = Issuer::start().await?;
    println!("1. CI OIDC issuer at {} (JWKS at /jwks)", issuer.url);

    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let mut opts = DevOptions::embedded(dir.path());
    opts.policy = POLICY.into();
    opts.extra_config = format!(
        r#"
[[oidc]]
issuer = "{url}"
jwks_url = "{url}/jwks"
audiences = ["{CI_AUDIENCE}"]
max_token_age = "10m"

[[mapping]]
attestor = "oidc"
spiffe_id = "spiffe://{{trust_domain}}/ci/{{claims.repository_owner}}/{{claims.environment}}"
match = {{ iss = "{url}" }}
"#,
        url = issuer.url
    );
    let running = opts.start().await?;
    println!(
        "2. broker trusting that issuer, gRPC on {}",
        running.endpoints.grpc_addr
    );
    let channel = ConnectOptions {
        addr: Some(running.endpoints.grpc_addr.clone()),
        ca_file: Some(running.endpoints.ca_bundle.clone()),
        ..ConnectOptions::default()
    }
    .connect()
    .await?;
    let mut broker = BrokerClient::new(channel.clone());
    let deploy_target = RevocationsClient::new(channel);

    // The job's evidence: what `ephemera run` finds in ACTIONS_ID_TOKEN_REQUEST_URL on GitHub.
    let job = Evidence::bearer(Source::GitHubActions, &issuer.job_token("refs/heads/main")?)?;
    let task = broker
        .begin_task(job.request(BeginTaskRequest {
            max_duration_seconds: Some(600),
            labels: [("run_id".to_owned(), "8812".to_owned())].into(),
            ..BeginTaskRequest::default()
        }))
        .await
        .context("BeginTask")?
        .into_inner();
    println!(
        "3. job on main began task {} as {}",
        task.task_id, task.spiffe_id
    );

    let credential = broker
        .mint_jwt_svid(job.request(MintJwtSvidRequest {
            audience: vec![DEPLOY_AUDIENCE.into()],
            ttl_seconds: Some(600),
            task_id: task.task_id.clone(),
            ..MintJwtSvidRequest::default()
        }))
        .await
        .context("minting the deploy credential")?
        .into_inner();
    println!(
        "4. deploy credential for {DEPLOY_AUDIENCE}: jti {}",
        credential.jti
    );

    let check = |token: String| {
        let mut target = deploy_target.clone();
        async move {
            anyhow::Ok(
                target
                    .introspect(IntrospectRequest { token })
                    .await?
                    .into_inner(),
            )
        }
    };
    let seen = check(credential.token.clone()).await?;
    ensure!(
        seen.active,
        "the deploy target must accept a live credential"
    );
    ensure!(seen.task_id == task.task_id);
    println!(
        "5. deploy target: credential active, task {} — deploying",
        seen.task_id
    );

    let ended = broker
        .end_task(job.request(EndTaskRequest {
            task_id: task.task_id.clone(),
        }))
        .await
        .context("EndTask")?
        .into_inner();
    println!("6. job step over: task {}", ended.state);

    let seen = check(credential.token.clone()).await?;
    ensure!(
        !seen.active,
        "a credential of an ended task must be refused"
    );
    println!("7. deploy target: the same credential is now refused (active: false)");

    let feature = Evidence::bearer(
        Source::GitHubActions,
        &issuer.job_token("refs/heads/feature")?,
    )?;
    match broker
        .begin_task(feature.request(BeginTaskRequest::default()))
        .await
    {
        Err(s) if s.code() == tonic::Code::PermissionDenied => {
            println!("8. a job on refs/heads/feature is denied: {}", s.message());
        }
        other => bail!("a job off main must be denied, got {other:?}"),
    }

    running.shutdown().await.map_err(anyhow::Error::msg)?;
    println!("ok: the deploy credential lived exactly as long as the job step");
    Ok(())
}
