//! OIDC evidence: parsing and validating untrusted compact JWS tokens never panics.
//!
//! First byte even: the rest is the token as sent (header, payload and signature parsing,
//! issuer and algorithm checks). Odd: the rest is a claims object, signed with the issuer's
//! real key, so claim validation (exp/nbf/iat, audience, age, claim limits) is reached too.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ephemera::attest::jwks::{Alg, JwksCache, JwksSource};
use ephemera::attest::oidc::{OidcAttestor, OidcIssuer};
use ephemera::attest::{Attestor, Evidence};
use ephemera::secret::Secret;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};

const ISSUER: &str = "https://issuer.fuzz.invalid";

struct Setup {
    runtime: tokio::runtime::Runtime,
    attestor: OidcAttestor,
    key: EcdsaKeyPair,
    _dir: std::path::PathBuf,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .unwrap_or_else(|_| std::process::abort());
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap_or_else(|_| std::process::abort());
        let pt = key.public_key().as_ref();
        let jwks = serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1",
            "x": URL_SAFE_NO_PAD.encode(&pt[1..33]), "y": URL_SAFE_NO_PAD.encode(&pt[33..])}]});
        let dir = std::env::temp_dir().join(format!("ephemera-fuzz-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("jwks.json");
        let _ = std::fs::write(&path, jwks.to_string());
        let issuer = OidcIssuer {
            issuer: ISSUER.into(),
            audiences: vec!["fuzz".into()],
            algorithms: vec![Alg::Es256, Alg::Rs256],
            max_token_age: Some(Duration::from_secs(600)),
            max_token_lifetime: Duration::from_secs(86_400),
            clock_skew: Duration::from_secs(30),
            required_claims: Vec::new(),
            jwks: JwksCache::new(JwksSource::File(path), Duration::from_secs(30)),
        };
        Setup {
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap_or_else(|_| std::process::abort()),
            attestor: OidcAttestor::new(vec![issuer], Arc::new(ephemera::clock::SystemClock)),
            key,
            _dir: dir,
        }
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let s = setup();
    let token = if mode % 2 == 0 {
        String::from_utf8_lossy(rest).into_owned()
    } else {
        let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"ES256","kid":"k1","typ":"JWT"}"#);
        let input = format!("{header}.{}", URL_SAFE_NO_PAD.encode(rest));
        let Ok(sig) = s.key.sign(&SystemRandom::new(), input.as_bytes()) else {
            return;
        };
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))
    };
    let evidence = Evidence {
        bearer: Some(Secret::new(token)),
        ..Evidence::default()
    };
    let _ = s.runtime.block_on(s.attestor.attest(&evidence));
});
