//! Validated identifiers and bounded values: trust domains, SPIFFE IDs, audiences, lifetimes.
//!
//! Parse, don't validate: a value of one of these types obeys its rules by construction, so the
//! rest of the broker never re-checks them. SPIFFE ID rules follow the SPIFFE ID specification
//! (lowercase scheme and trust domain, no empty, `.` or `..` segments, no query, fragment, port
//! or user info).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// Longest SPIFFE ID accepted, in bytes (the SPIFFE ID spec's URI limit).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
/// Longest trust domain name accepted, in bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// Longest audience accepted, in bytes.
pub const MAX_AUDIENCE_LEN: usize = 256;
/// Most audiences one JWT-SVID may carry.
pub const MAX_AUDIENCES: usize = 16;

/// Why an identifier or bounded value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The SPIFFE ID does not start with the lowercase `spiffe://` scheme.
    #[error("spiffe id must start with \"spiffe://\"")]
    Scheme,
    /// The trust domain is empty.
    #[error("trust domain is empty")]
    EmptyTrustDomain,
    /// The trust domain has a character outside `[a-z0-9.-_]`.
    #[error("trust domain may contain only lowercase letters, digits, '.', '-' and '_'")]
    TrustDomainChar,
    /// The trust domain is longer than [`MAX_TRUST_DOMAIN_LEN`].
    #[error("trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong,
    /// The SPIFFE ID is longer than [`MAX_SPIFFE_ID_LEN`].
    #[error("spiffe id is longer than {MAX_SPIFFE_ID_LEN} bytes")]
    TooLong,
    /// A path segment is empty (`//` or a trailing `/`).
    #[error("spiffe id path has an empty segment")]
    EmptySegment,
    /// A path segment is `.` or `..`.
    #[error("spiffe id path has a '.' or '..' segment")]
    DotSegment,
    /// A path segment has a character outside `[A-Za-z0-9.-_]`.
    #[error("spiffe id path may contain only letters, digits, '.', '-' and '_'")]
    PathChar,
    /// The SPIFFE ID is in a different trust domain than required.
    #[error("spiffe id is not in trust domain {expected}")]
    ForeignTrustDomain {
        /// The trust domain that was required.
        expected: String,
    },
    /// The audience is empty.
    #[error("audience is empty")]
    EmptyAudience,
    /// The audience is longer than [`MAX_AUDIENCE_LEN`].
    #[error("audience is longer than {MAX_AUDIENCE_LEN} bytes")]
    AudienceTooLong,
    /// The audience has a control or whitespace character.
    #[error("audience may contain only printable characters without spaces")]
    AudienceChar,
    /// No audience was given.
    #[error("at least one audience is required")]
    NoAudience,
    /// More than [`MAX_AUDIENCES`] audiences were given.
    #[error("at most {MAX_AUDIENCES} audiences are allowed, got {got}")]
    TooManyAudiences {
        /// How many were given.
        got: usize,
    },
    /// A lifetime of zero.
    #[error("ttl must be at least 1s")]
    ZeroTtl,
    /// A lifetime above [`Ttl::MAX`].
    #[error("ttl {requested_secs}s is above the maximum of {max_secs}s")]
    TtlTooLong {
        /// The requested lifetime in seconds.
        requested_secs: u64,
        /// The largest lifetime accepted, in seconds.
        max_secs: u64,
    },
}

/// A SPIFFE trust domain such as `example.org`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// The trust domain name, without scheme.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain's own SPIFFE ID, `spiffe://<name>`, as used in CA certificates.
    pub fn id_uri(&self) -> String {
        format!("spiffe://{}", self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, IdError> {
        if s.is_empty() {
            return Err(IdError::EmptyTrustDomain);
        }
        if s.len() > MAX_TRUST_DOMAIN_LEN {
            return Err(IdError::TrustDomainTooLong);
        }
        if !s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        }) {
            return Err(IdError::TrustDomainChar);
        }
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A SPIFFE ID such as `spiffe://example.org/ci/deploy`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    uri: String,
    /// Byte offset where the path starts (the first `/` after the trust domain), or `uri.len()`.
    path_start: usize,
}

impl SpiffeId {
    /// The whole URI.
    pub fn as_str(&self) -> &str {
        &self.uri
    }

    /// The trust domain part.
    pub fn trust_domain(&self) -> &str {
        &self.uri["spiffe://".len()..self.path_start]
    }

    /// The path, starting with `/`, or empty for the trust domain's own ID.
    pub fn path(&self) -> &str {
        &self.uri[self.path_start..]
    }

    /// Parses `s` and requires it to be inside `trust_domain`.
    pub fn parse_in(s: &str, trust_domain: &TrustDomain) -> Result<Self, IdError> {
        let id: Self = s.parse()?;
        if id.trust_domain() != trust_domain.as_str() {
            return Err(IdError::ForeignTrustDomain {
                expected: trust_domain.to_string(),
            });
        }
        Ok(id)
    }
}

/// Checks one SPIFFE ID path segment (without slashes).
pub fn check_path_segment(segment: &str) -> Result<(), IdError> {
    if segment.is_empty() {
        return Err(IdError::EmptySegment);
    }
    if segment == "." || segment == ".." {
        return Err(IdError::DotSegment);
    }
    if !segment
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err(IdError::PathChar);
    }
    Ok(())
}

impl FromStr for SpiffeId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, IdError> {
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(IdError::TooLong);
        }
        let rest = s.strip_prefix("spiffe://").ok_or(IdError::Scheme)?;
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        TrustDomain::from_str(td)?;
        if !path.is_empty() {
            for segment in path[1..].split('/') {
                check_path_segment(segment)?;
            }
        }
        Ok(Self {
            uri: s.to_owned(),
            path_start: "spiffe://".len() + td.len(),
        })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

/// One JWT audience: 1 to [`MAX_AUDIENCE_LEN`] printable, non-space characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Audience(String);

impl Audience {
    /// The audience text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Parses a list of audiences: 1 to [`MAX_AUDIENCES`] of them.
    pub fn parse_list<S: AsRef<str>>(items: &[S]) -> Result<Vec<Self>, IdError> {
        if items.is_empty() {
            return Err(IdError::NoAudience);
        }
        if items.len() > MAX_AUDIENCES {
            return Err(IdError::TooManyAudiences { got: items.len() });
        }
        items.iter().map(|a| a.as_ref().parse()).collect()
    }
}

impl FromStr for Audience {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, IdError> {
        if s.is_empty() {
            return Err(IdError::EmptyAudience);
        }
        if s.len() > MAX_AUDIENCE_LEN {
            return Err(IdError::AudienceTooLong);
        }
        if s.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(IdError::AudienceChar);
        }
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for Audience {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A credential lifetime: at least one second, at most [`Ttl::MAX`].
///
/// [`Ttl::MAX`] is a sanity bound on input, not policy: the configured maximum (and later the
/// task deadline and policy caps) clamp the granted lifetime further.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ttl(Duration);

impl Ttl {
    /// The longest lifetime anyone may ask for: 30 days.
    pub const MAX: Duration = Duration::from_secs(30 * 24 * 3600);

    /// Builds a lifetime from whole seconds.
    pub fn from_secs(secs: u64) -> Result<Self, IdError> {
        Self::new(Duration::from_secs(secs))
    }

    /// Builds a lifetime, rejecting zero and anything above [`Ttl::MAX`].
    pub fn new(d: Duration) -> Result<Self, IdError> {
        if d.as_secs() == 0 {
            return Err(IdError::ZeroTtl);
        }
        if d > Self::MAX {
            return Err(IdError::TtlTooLong {
                requested_secs: d.as_secs(),
                max_secs: Self::MAX.as_secs(),
            });
        }
        Ok(Self(Duration::from_secs(d.as_secs())))
    }

    /// The lifetime as a duration (whole seconds).
    pub fn duration(self) -> Duration {
        self.0
    }

    /// The lifetime in seconds.
    pub fn as_secs(self) -> u64 {
        self.0.as_secs()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids() {
        let ok = [
            "spiffe://example.org",
            "spiffe://example.org/ci/deploy",
            "spiffe://a-b_c.d/x.y-z_0/A9",
        ];
        for s in ok {
            let id: SpiffeId = s.parse().unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(id.as_str(), s);
        }
        let id: SpiffeId = "spiffe://example.org/ci/deploy".parse().unwrap();
        assert_eq!(id.trust_domain(), "example.org");
        assert_eq!(id.path(), "/ci/deploy");

        let long = format!("spiffe://example.org/{}", "a".repeat(MAX_SPIFFE_ID_LEN));
        let bad: &[(&str, IdError)] = &[
            ("http://example.org/x", IdError::Scheme),
            ("SPIFFE://example.org/x", IdError::Scheme),
            ("spiffe://", IdError::EmptyTrustDomain),
            ("spiffe:///x", IdError::EmptyTrustDomain),
            ("spiffe://Example.org/x", IdError::TrustDomainChar),
            ("spiffe://example.org:443/x", IdError::TrustDomainChar),
            ("spiffe://user@example.org/x", IdError::TrustDomainChar),
            ("spiffe://example.org/", IdError::EmptySegment),
            ("spiffe://example.org/a//b", IdError::EmptySegment),
            ("spiffe://example.org/a/", IdError::EmptySegment),
            ("spiffe://example.org/a/../b", IdError::DotSegment),
            ("spiffe://example.org/./b", IdError::DotSegment),
            ("spiffe://example.org/a?b", IdError::PathChar),
            ("spiffe://example.org/a#b", IdError::PathChar),
            ("spiffe://example.org/a%2Fb", IdError::PathChar),
            ("spiffe://example.org/a b", IdError::PathChar),
            (&long, IdError::TooLong),
        ];
        for (input, want) in bad {
            assert_eq!(input.parse::<SpiffeId>().as_ref(), Err(want), "{input}");
        }
    }

    #[test]
    fn spiffe_id_in_trust_domain() {
        let td: TrustDomain = "example.org".parse().unwrap();
        assert!(SpiffeId::parse_in("spiffe://example.org/a", &td).is_ok());
        assert_eq!(
            SpiffeId::parse_in("spiffe://other.org/a", &td),
            Err(IdError::ForeignTrustDomain {
                expected: "example.org".into()
            })
        );
    }

    #[test]
    fn audiences() {
        assert_eq!(Audience::parse_list::<&str>(&[]), Err(IdError::NoAudience));
        let many: Vec<String> = (0..17).map(|i| format!("a{i}")).collect();
        assert_eq!(
            Audience::parse_list(&many),
            Err(IdError::TooManyAudiences { got: 17 })
        );
        assert_eq!(Audience::parse_list(&many[..16]).map(|v| v.len()), Ok(16));
        let bad: &[(String, IdError)] = &[
            (String::new(), IdError::EmptyAudience),
            ("a".repeat(257), IdError::AudienceTooLong),
            ("a b".into(), IdError::AudienceChar),
            ("a\nb".into(), IdError::AudienceChar),
        ];
        for (input, want) in bad {
            assert_eq!(input.parse::<Audience>().as_ref(), Err(want), "{input:?}");
        }
        assert!("https://deploy.example.org".parse::<Audience>().is_ok());
    }

    #[test]
    fn ttls() {
        assert_eq!(Ttl::from_secs(0), Err(IdError::ZeroTtl));
        assert_eq!(Ttl::from_secs(60).map(Ttl::as_secs), Ok(60));
        assert!(Ttl::new(Ttl::MAX).is_ok());
        assert_eq!(
            Ttl::from_secs(Ttl::MAX.as_secs() + 1),
            Err(IdError::TtlTooLong {
                requested_secs: Ttl::MAX.as_secs() + 1,
                max_secs: Ttl::MAX.as_secs()
            })
        );
    }
}
