//! Claims as attestors yield them and as rules read them: paths into nested claims
//! (`kubernetes.io` → `namespace`) and the values a claim must match. Identity mapping
//! (`policy::mapping`) and the OIDC attestor's required claims read claims the same way.

use serde_json::Value;

/// What a claim must equal for a rule to apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MatchValue {
    /// Exactly this value.
    Equals(String),
    /// Any of these values.
    AnyOf(Vec<String>),
}

impl MatchValue {
    fn accepts(&self, v: &str) -> bool {
        match self {
            Self::Equals(want) => want == v,
            Self::AnyOf(list) => list.iter().any(|w| w == v),
        }
    }

    /// Whether a claim satisfies this condition: a scalar equal to an accepted value, or an
    /// array holding one. A missing claim never does.
    pub fn matches(&self, claim: Option<&Value>) -> bool {
        match claim {
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(scalar_text)
                .any(|v| self.accepts(&v)),
            Some(v) => scalar_text(v).is_some_and(|v| self.accepts(&v)),
            None => false,
        }
    }
}

/// A path into nested claims, e.g. `kubernetes.io` → `namespace`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimPath(Vec<String>);

impl ClaimPath {
    /// Parses `a.b."c.d"`: dot-separated parts, a part with dots in double quotes.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = s;
        loop {
            let (part, after) = if let Some(q) = rest.strip_prefix('"') {
                let end = q
                    .find('"')
                    .ok_or_else(|| format!("unterminated quote in claim path {s:?}"))?;
                (&q[..end], &q[end + 1..])
            } else {
                let end = rest.find('.').unwrap_or(rest.len());
                (&rest[..end], &rest[end..])
            };
            if part.is_empty() {
                return Err(format!("empty part in claim path {s:?}"));
            }
            parts.push(part.to_owned());
            match after.strip_prefix('.') {
                Some(next) => rest = next,
                None if after.is_empty() => break,
                None => return Err(format!("invalid claim path {s:?}")),
            }
        }
        Ok(Self(parts))
    }

    /// The claim at this path, if present.
    pub fn lookup<'a>(&self, claims: &'a serde_json::Map<String, Value>) -> Option<&'a Value> {
        let (first, rest) = self.0.split_first()?;
        rest.iter()
            .try_fold(claims.get(first)?, |v, part| v.as_object()?.get(part))
    }
}

impl std::fmt::Display for ClaimPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown: Vec<String> = self
            .0
            .iter()
            .map(|p| {
                if p.contains('.') {
                    format!("\"{p}\"")
                } else {
                    p.clone()
                }
            })
            .collect();
        f.write_str(&shown.join("."))
    }
}

/// A scalar claim as text; `None` for objects, arrays and null.
pub fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}
