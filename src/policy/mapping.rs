//! Identity mapping: config rules that turn an [`AttestedIdentity`] into SPIFFE IDs.
//!
//! A rule names an attestor, claim conditions, and a template such as
//! `spiffe://{trust_domain}/ci/{claims.repository_owner}/{claims.run_id}`. Claim paths may be
//! nested (`claims.kubernetes.namespace`) and a path part with dots is quoted
//! (`claims."kubernetes.io".namespace`). A claim value rendered into a template must itself be a
//! valid SPIFFE ID path segment: a value carrying `/`, `..` or any other character outside the
//! SPIFFE grammar is refused, never escaped or trimmed, so a claim can never inject path segments.

use std::collections::BTreeMap;

use crate::attest::claims::{ClaimPath, scalar_text};
use crate::attest::{ATTESTOR_NAMES, AttestedIdentity};
use crate::id::{SpiffeId, TrustDomain, check_path_segment};

pub use crate::attest::claims::MatchValue;

/// Longest claim value rendered into a SPIFFE ID, in bytes.
pub const MAX_CLAIM_VALUE_LEN: usize = 255;

/// Why an attested identity could not be mapped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MappingError {
    /// No rule matched the identity.
    #[error(
        "no identity mapping: no mapping rule gives an identity to this caller, attested by `{attestor}`"
    )]
    NoMapping {
        /// The attestor that verified the caller (what it presented).
        attestor: &'static str,
    },
    /// A claim rendered into a template is not a safe SPIFFE ID path segment.
    #[error("claim {claim} cannot be used in a spiffe id: {reason}")]
    UnsafeClaimValue {
        /// The claim path.
        claim: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The caller asked for a SPIFFE ID that is not among its mapped identities.
    #[error("{requested} is not an identity of this caller")]
    NotMapped {
        /// The SPIFFE ID asked for.
        requested: String,
    },
}

/// One part of a SPIFFE ID template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    TrustDomain,
    Claim(ClaimPath),
}

/// A validated mapping rule.
#[derive(Debug, Clone)]
pub struct MappingRule {
    attestor: String,
    template: Vec<Part>,
    matches: Vec<(ClaimPath, MatchValue)>,
}

impl MappingRule {
    /// Validates a rule. Errors are `(field, message)` pairs, all of them at once.
    pub fn new(
        attestor: &str,
        template: &str,
        matches: BTreeMap<String, MatchValue>,
        trust_domain: &TrustDomain,
    ) -> Result<Self, Vec<(String, String)>> {
        let mut errors = Vec::new();
        if !ATTESTOR_NAMES.contains(&attestor) {
            errors.push((
                "attestor".to_owned(),
                format!(
                    "unknown attestor {attestor:?} (known: {})",
                    ATTESTOR_NAMES.join(", ")
                ),
            ));
        }
        let parts = match parse_template(template) {
            Ok(parts) => {
                // Render with a harmless sample for every claim: if that is not a valid SPIFFE ID
                // in our trust domain, the template itself is wrong.
                let sample = render_parts(&parts, trust_domain, |_| Ok("x".to_owned()));
                match sample.and_then(|s| {
                    SpiffeId::parse_in(&s, trust_domain).map_err(|e| {
                        MappingError::UnsafeClaimValue {
                            claim: String::new(),
                            reason: e.to_string(),
                        }
                    })
                }) {
                    Ok(_) => Some(parts),
                    Err(e) => {
                        let reason = match e {
                            MappingError::UnsafeClaimValue { reason, .. } => reason,
                            other => other.to_string(),
                        };
                        errors.push((
                            "spiffe_id".to_owned(),
                            format!(
                                "template {template:?} does not yield a valid spiffe id: {reason}"
                            ),
                        ));
                        None
                    }
                }
            }
            Err(e) => {
                errors.push(("spiffe_id".to_owned(), e));
                None
            }
        };
        let mut conditions = Vec::new();
        for (path, value) in matches {
            match ClaimPath::parse(&path) {
                Ok(p) => conditions.push((p, value)),
                Err(e) => errors.push((format!("match.{path}"), e)),
            }
        }
        match parts {
            Some(template) if errors.is_empty() => Ok(Self {
                attestor: attestor.to_owned(),
                template,
                matches: conditions,
            }),
            _ => Err(errors),
        }
    }

    fn applies_to(&self, id: &AttestedIdentity) -> bool {
        self.attestor == id.attestor
            && self
                .matches
                .iter()
                .all(|(path, want)| want.matches(path.lookup(&id.claims)))
    }

    /// Renders this rule's SPIFFE ID for `id`; `Ok(None)` when a template claim is missing.
    fn render(
        &self,
        id: &AttestedIdentity,
        trust_domain: &TrustDomain,
    ) -> Result<Option<SpiffeId>, MappingError> {
        let mut missing = false;
        let rendered = render_parts(&self.template, trust_domain, |path| {
            let Some(value) = path.lookup(&id.claims) else {
                missing = true;
                return Ok(String::new());
            };
            let text = scalar_text(value).ok_or_else(|| MappingError::UnsafeClaimValue {
                claim: path.to_string(),
                reason: "not a string, number or boolean".to_owned(),
            })?;
            if text.len() > MAX_CLAIM_VALUE_LEN {
                return Err(MappingError::UnsafeClaimValue {
                    claim: path.to_string(),
                    reason: format!("longer than {MAX_CLAIM_VALUE_LEN} bytes"),
                });
            }
            check_path_segment(&text).map_err(|e| MappingError::UnsafeClaimValue {
                claim: path.to_string(),
                reason: e.to_string(),
            })?;
            Ok(text)
        })?;
        if missing {
            return Ok(None);
        }
        SpiffeId::parse_in(&rendered, trust_domain)
            .map(Some)
            .map_err(|e| MappingError::UnsafeClaimValue {
                claim: "(template)".to_owned(),
                reason: e.to_string(),
            })
    }
}

fn parse_template(t: &str) -> Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    let mut rest = t;
    while let Some(open) = rest.find('{') {
        if open > 0 {
            parts.push(Part::Literal(rest[..open].to_owned()));
        }
        let close = rest[open..]
            .find('}')
            .ok_or_else(|| format!("unclosed '{{' in template {t:?}"))?
            + open;
        let name = &rest[open + 1..close];
        parts.push(match name {
            "trust_domain" => Part::TrustDomain,
            _ => match name.strip_prefix("claims.") {
                Some(path) => Part::Claim(ClaimPath::parse(path)?),
                None => {
                    return Err(format!(
                        "unknown placeholder {{{name}}} (use {{trust_domain}} or {{claims.NAME}})"
                    ));
                }
            },
        });
        rest = &rest[close + 1..];
    }
    if rest.contains('}') {
        return Err(format!("unmatched '}}' in template {t:?}"));
    }
    if !rest.is_empty() {
        parts.push(Part::Literal(rest.to_owned()));
    }
    Ok(parts)
}

fn render_parts(
    parts: &[Part],
    trust_domain: &TrustDomain,
    mut claim: impl FnMut(&ClaimPath) -> Result<String, MappingError>,
) -> Result<String, MappingError> {
    let mut out = String::new();
    for part in parts {
        match part {
            Part::Literal(s) => out.push_str(s),
            Part::TrustDomain => out.push_str(trust_domain.as_str()),
            Part::Claim(path) => out.push_str(&claim(path)?),
        }
    }
    Ok(out)
}

/// All mapping rules of a trust domain.
#[derive(Debug, Clone)]
pub struct Mapper {
    trust_domain: TrustDomain,
    rules: Vec<MappingRule>,
}

impl Mapper {
    /// A mapper over `rules`, tried in order.
    pub fn new(trust_domain: TrustDomain, rules: Vec<MappingRule>) -> Self {
        Self {
            trust_domain,
            rules,
        }
    }

    /// Every SPIFFE ID the rules give `id`, in rule order, without duplicates. The first is the
    /// default identity. A rule whose template would carry an unsafe claim value fails the whole
    /// mapping: that is an injection attempt, not a non-match.
    pub fn map(&self, id: &AttestedIdentity) -> Result<Vec<SpiffeId>, MappingError> {
        let mut out: Vec<SpiffeId> = Vec::new();
        for rule in self.rules.iter().filter(|r| r.applies_to(id)) {
            if let Some(spiffe_id) = rule.render(id, &self.trust_domain)?
                && !out.contains(&spiffe_id)
            {
                out.push(spiffe_id);
            }
        }
        if out.is_empty() {
            return Err(MappingError::NoMapping {
                attestor: id.attestor,
            });
        }
        Ok(out)
    }

    /// The identity to use: `requested` if it is one of `id`'s, else the first.
    pub fn select(
        &self,
        id: &AttestedIdentity,
        requested: Option<&SpiffeId>,
    ) -> Result<SpiffeId, MappingError> {
        let mut ids = self.map(id)?;
        match requested {
            None => Ok(ids.swap_remove(0)),
            Some(want) => {
                ids.into_iter()
                    .find(|i| i == want)
                    .ok_or_else(|| MappingError::NotMapped {
                        requested: want.to_string(),
                    })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn td() -> TrustDomain {
        "example.org".parse().unwrap()
    }

    fn rule(template: &str, matches: &[(&str, MatchValue)]) -> MappingRule {
        let m = matches
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect();
        MappingRule::new("unix", template, m, &td()).unwrap()
    }

    fn identity(claims: Value) -> AttestedIdentity {
        AttestedIdentity {
            attestor: "unix",
            subject: "test".into(),
            claims: claims.as_object().unwrap().clone(),
            issued_at: None,
            expires_at: None,
            single_use: None,
        }
    }

    #[test]
    fn renders_flat_and_nested_claims() {
        let mapper = Mapper::new(
            td(),
            vec![rule(
                "spiffe://{trust_domain}/ns/{claims.\"kubernetes.io\".namespace}/sa/{claims.sa}",
                &[],
            )],
        );
        let id = identity(json!({"kubernetes.io": {"namespace": "prod"}, "sa": "api"}));
        assert_eq!(
            mapper.map(&id).unwrap()[0].as_str(),
            "spiffe://example.org/ns/prod/sa/api"
        );
    }

    #[test]
    fn conditions_select_rules() {
        let mapper = Mapper::new(
            td(),
            vec![
                rule(
                    "spiffe://example.org/uid/{claims.uid}",
                    &[("uid", MatchValue::Equals("1000".into()))],
                ),
                rule(
                    "spiffe://example.org/group/{claims.gid}",
                    &[("gid", MatchValue::AnyOf(vec!["10".into(), "20".into()]))],
                ),
            ],
        );
        let both = mapper
            .map(&identity(json!({"uid": 1000, "gid": 20})))
            .unwrap();
        let shown: Vec<&str> = both.iter().map(SpiffeId::as_str).collect();
        assert_eq!(
            shown,
            [
                "spiffe://example.org/uid/1000",
                "spiffe://example.org/group/20"
            ]
        );
        assert_eq!(
            mapper.map(&identity(json!({"uid": 1001, "gid": 30}))),
            Err(MappingError::NoMapping { attestor: "unix" })
        );
        let second: SpiffeId = "spiffe://example.org/group/20".parse().unwrap();
        let id = identity(json!({"uid": 1000, "gid": 20}));
        assert_eq!(mapper.select(&id, Some(&second)).unwrap(), second);
        let other: SpiffeId = "spiffe://example.org/admin".parse().unwrap();
        assert_eq!(
            mapper.select(&id, Some(&other)),
            Err(MappingError::NotMapped {
                requested: "spiffe://example.org/admin".into()
            })
        );
    }

    #[test]
    fn claim_values_cannot_inject_path() {
        let mapper = Mapper::new(
            td(),
            vec![rule("spiffe://example.org/repo/{claims.repo}", &[])],
        );
        let rows = [
            ("a/b", "path may contain only"),
            ("..", "'.' or '..'"),
            ("", "empty segment"),
            ("a?b", "path may contain only"),
            ("ünïcode", "path may contain only"),
        ];
        for (value, reason) in rows {
            match mapper.map(&identity(json!({ "repo": value }))) {
                Err(MappingError::UnsafeClaimValue { claim, reason: r }) => {
                    assert_eq!(claim, "repo");
                    assert!(r.contains(reason), "{value:?}: {r}");
                }
                other => panic!("{value:?} should be refused, got {other:?}"),
            }
        }
        let long = "a".repeat(MAX_CLAIM_VALUE_LEN + 1);
        assert!(matches!(
            mapper.map(&identity(json!({ "repo": long }))),
            Err(MappingError::UnsafeClaimValue { .. })
        ));
        assert!(matches!(
            mapper.map(&identity(json!({ "repo": {"nested": 1} }))),
            Err(MappingError::UnsafeClaimValue { .. })
        ));
    }

    #[test]
    fn missing_template_claim_means_rule_does_not_apply() {
        let mapper = Mapper::new(
            td(),
            vec![rule("spiffe://example.org/repo/{claims.repo}", &[])],
        );
        assert_eq!(
            mapper.map(&identity(json!({"other": "x"}))),
            Err(MappingError::NoMapping { attestor: "unix" })
        );
    }

    #[test]
    fn templates_are_checked_when_loaded() {
        let rows = [
            ("spiffe://example.org/{uid}", "unknown placeholder"),
            ("spiffe://example.org/{claims.a", "unclosed"),
            ("spiffe://example.org/a}", "unmatched"),
            ("spiffe://other.org/{claims.a}", "not in trust domain"),
            ("spiffe://example.org//{claims.a}", "empty segment"),
            ("https://example.org/{claims.a}", "must start with"),
            ("spiffe://example.org/{claims.}", "empty part"),
        ];
        for (template, want) in rows {
            let errs = MappingRule::new("unix", template, BTreeMap::new(), &td()).unwrap_err();
            assert!(
                errs.iter()
                    .any(|(f, m)| f == "spiffe_id" && m.contains(want)),
                "{template}: {errs:?}"
            );
        }
    }
}
