//! A test OIDC issuer: its own ES256 and RS256 keys, JWKS served over real HTTP on loopback, and
//! tokens shaped like GitHub Actions, GitLab CI and Kubernetes service-account tokens.

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair, RsaKeyPair};
use serde_json::{Value, json};

/// PKCS#8 RSA-2048 key of the test issuer (test fixture; protects nothing).
const RSA_PEM: &str = include_str!("../fixtures/test-issuer-rsa.pem");

pub struct TestIssuer {
    /// Base URL, e.g. `http://127.0.0.1:PORT`.
    pub base: String,
    es: EcdsaKeyPair,
    rsa: RsaKeyPair,
    /// Key id of the ES256 key.
    pub es_kid: String,
    /// Key id of the RS256 key.
    pub rsa_kid: String,
    rng: SystemRandom,
    /// The JWKS document served.
    pub jwks: Value,
}

/// Reads a DER INTEGER at `pos`; returns (value without leading zero, next position).
fn der_int(d: &[u8], pos: usize) -> (Vec<u8>, usize) {
    assert_eq!(d[pos], 0x02);
    let (len, start) = if d[pos + 1] & 0x80 == 0 {
        (d[pos + 1] as usize, pos + 2)
    } else {
        let n = (d[pos + 1] & 0x7f) as usize;
        let len = d[pos + 2..pos + 2 + n]
            .iter()
            .fold(0usize, |a, b| (a << 8) | *b as usize);
        (len, pos + 2 + n)
    };
    let mut v = d[start..start + len].to_vec();
    while v.len() > 1 && v[0] == 0 {
        v.remove(0);
    }
    (v, start + len)
}

impl TestIssuer {
    pub async fn start() -> Arc<Self> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .unwrap();
        let es = EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8.as_ref(),
            &rng,
        )
        .unwrap();
        let rsa_der = pem::parse(RSA_PEM).unwrap().into_contents();
        let rsa = RsaKeyPair::from_pkcs8(&rsa_der).unwrap();
        // RSAPublicKey ::= SEQUENCE { modulus INTEGER, publicExponent INTEGER }
        let pubkey = rsa.public().as_ref();
        let seq_start = if pubkey[1] & 0x80 == 0 {
            2
        } else {
            2 + (pubkey[1] & 0x7f) as usize
        };
        let (n, next) = der_int(pubkey, seq_start);
        let (e, _) = der_int(pubkey, next);
        let pt = es.public_key().as_ref();
        let jwks = json!({"keys": [
            {"kty": "EC", "crv": "P-256", "kid": "es-1", "use": "sig", "alg": "ES256",
             "x": URL_SAFE_NO_PAD.encode(&pt[1..33]), "y": URL_SAFE_NO_PAD.encode(&pt[33..])},
            {"kty": "RSA", "kid": "rsa-1", "use": "sig", "alg": "RS256",
             "n": URL_SAFE_NO_PAD.encode(&n), "e": URL_SAFE_NO_PAD.encode(&e)},
        ]});
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let doc = jwks.to_string();
        let app = axum::Router::new().route(
            "/jwks",
            axum::routing::get(move || {
                let doc = doc.clone();
                async move {
                    (
                        [(axum::http::header::CONTENT_TYPE, "application/json")],
                        doc,
                    )
                }
            }),
        );
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Arc::new(Self {
            base,
            es,
            rsa,
            es_kid: "es-1".into(),
            rsa_kid: "rsa-1".into(),
            rng,
            jwks,
        })
    }

    pub fn jwks_url(&self) -> String {
        format!("{}/jwks", self.base)
    }

    /// The issuer URL for one platform flavour (`github`, `gitlab`, `k8s`).
    pub fn issuer(&self, flavour: &str) -> String {
        format!("{}/{flavour}", self.base)
    }

    /// Signs `claims` with `header` (alg decides the key; unknown algs get an empty signature).
    pub fn sign(&self, header: &Value, claims: &Value) -> String {
        let h = URL_SAFE_NO_PAD.encode(header.to_string());
        let c = URL_SAFE_NO_PAD.encode(claims.to_string());
        let input = format!("{h}.{c}");
        let sig = match header["alg"].as_str() {
            Some("ES256") => self
                .es
                .sign(&self.rng, input.as_bytes())
                .unwrap()
                .as_ref()
                .to_vec(),
            Some("RS256") => {
                let mut sig = vec![0; self.rsa.public().modulus_len()];
                self.rsa
                    .sign(
                        &signature::RSA_PKCS1_SHA256,
                        &self.rng,
                        input.as_bytes(),
                        &mut sig,
                    )
                    .unwrap();
                sig
            }
            Some("HS256") => {
                // The classic confusion attack: HMAC keyed with the issuer's public key.
                let key =
                    ring::hmac::Key::new(ring::hmac::HMAC_SHA256, self.jwks.to_string().as_bytes());
                ring::hmac::sign(&key, input.as_bytes()).as_ref().to_vec()
            }
            _ => Vec::new(),
        };
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
    }

    pub fn es256(&self, claims: &Value) -> String {
        self.sign(
            &json!({"alg": "ES256", "kid": self.es_kid, "typ": "JWT"}),
            claims,
        )
    }

    pub fn rs256(&self, claims: &Value) -> String {
        self.sign(
            &json!({"alg": "RS256", "kid": self.rsa_kid, "typ": "JWT"}),
            claims,
        )
    }

    /// GitHub Actions ID token claims.
    pub fn github_claims(&self, now: i64, aud: &str, git_ref: &str, environment: &str) -> Value {
        json!({
            "iss": self.issuer("github"),
            "aud": aud,
            "sub": format!("repo:acme/app:environment:{environment}"),
            "repository": "acme/app",
            "repository_owner": "acme",
            "ref": git_ref,
            "environment": environment,
            "job_workflow_ref": format!("acme/app/.github/workflows/deploy.yml@{git_ref}"),
            "run_id": "4242",
            "run_attempt": "1",
            "iat": now,
            "nbf": now,
            "exp": now + 300,
        })
    }

    /// GitLab CI `id_tokens` claims.
    pub fn gitlab_claims(&self, now: i64, aud: &str) -> Value {
        json!({
            "iss": self.issuer("gitlab"),
            "aud": aud,
            "sub": "project_path:acme/app:ref_type:branch:ref:main",
            "project_path": "acme/app",
            "namespace_path": "acme",
            "ref": "main",
            "environment": "production",
            "pipeline_id": "777",
            "iat": now,
            "exp": now + 300,
        })
    }

    /// Kubernetes projected service-account token claims.
    pub fn k8s_claims(&self, now: i64, aud: &str, namespace: &str) -> Value {
        json!({
            "iss": self.issuer("k8s"),
            "aud": [aud],
            "sub": format!("system:serviceaccount:{namespace}:api"),
            "kubernetes.io": {
                "namespace": namespace,
                "serviceaccount": {"name": "api", "uid": "5f1b0a9e-1111-2222-3333-444455556666"},
                "pod": {"name": "api-7d9f8", "uid": "0c2d4e6f-aaaa-bbbb-cccc-ddddeeeeffff"},
            },
            "iat": now,
            "nbf": now,
            "exp": now + 3600,
        })
    }
}
