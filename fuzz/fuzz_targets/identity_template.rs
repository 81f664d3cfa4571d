//! Identity-template validation and rendering: arbitrary templates against arbitrary claims
//! never panic, and whatever renders is a valid SPIFFE ID of the trust domain.
//!
//! Input: the template on the first line, a JSON object of claims after it.
#![no_main]

use std::collections::BTreeMap;

use ephemera::attest::AttestedIdentity;
use ephemera::id::TrustDomain;
use ephemera::policy::Mapper;
use ephemera::policy::mapping::MappingRule;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (template, claims) = text.split_once('\n').unwrap_or((text, "{}"));
    let Ok(serde_json::Value::Object(claims)) = serde_json::from_str(claims) else {
        return;
    };
    let Ok(td) = "example.org".parse::<TrustDomain>() else {
        return;
    };
    let Ok(rule) = MappingRule::new("oidc", template, BTreeMap::new(), &td) else {
        return;
    };
    let mapper = Mapper::new(td, vec![rule]);
    let id = AttestedIdentity {
        attestor: "oidc",
        subject: "fuzz".into(),
        claims,
        issued_at: None,
        expires_at: None,
        single_use: None,
    };
    if let Ok(ids) = mapper.map(&id) {
        for spiffe_id in ids {
            assert_eq!(spiffe_id.trust_domain(), "example.org");
            assert!(
                spiffe_id
                    .to_string()
                    .parse::<ephemera::id::SpiffeId>()
                    .is_ok()
            );
        }
    }
});
