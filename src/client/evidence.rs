//! Evidence a client presents on each call, found explicitly or in the environment it runs in.
//!
//! Precedence, first match wins:
//!
//! 1. a join token (`--join-token`, `EPHEMERA_JOIN_TOKEN`);
//! 2. a token file (`--token-file`);
//! 3. a GitLab ID token in the variable named by `--gitlab-id-token` (`EPHEMERA_GITLAB_ID_TOKEN`);
//!
//! then, unless ambient discovery is off (`--no-ambient`):
//!
//! 4. GitHub Actions: when `ACTIONS_ID_TOKEN_REQUEST_URL` and `ACTIONS_ID_TOKEN_REQUEST_TOKEN`
//!    are set (the job has `permissions: id-token: write`), an ID token for the OIDC audience
//!    (`--oidc-audience`, default `ephemera`) is requested from the runner;
//! 5. GitLab CI: when `GITLAB_CI` is set and the job declares an `id_tokens` entry named
//!    `EPHEMERA_ID_TOKEN`;
//! 6. Kubernetes: the projected service-account token at `--k8s-token-file`
//!    (default `/var/run/secrets/tokens/ephemera`), when it exists;
//!
//! and last, nothing but the Unix socket's peer credentials, which the broker reads itself when
//! the client connects over its local socket.
//!
//! [`EvidenceOptions::resolve`] gathers evidence afresh; [`EvidenceCache`] reuses it for a short
//! while, so short-lived CI tokens and rotated projected tokens stay valid through long runs
//! without a fetch per call. Nothing here logs a token.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::secret::Secret;

/// Default audience of ID tokens requested from GitHub Actions.
pub const DEFAULT_OIDC_AUDIENCE: &str = "ephemera";
/// Default path of the projected Kubernetes service-account token.
pub const DEFAULT_K8S_TOKEN_FILE: &str = "/var/run/secrets/tokens/ephemera";
/// The GitLab `id_tokens` variable found without `--gitlab-id-token`.
pub const GITLAB_AMBIENT_VAR: &str = "EPHEMERA_ID_TOKEN";
/// Largest token read from a file, a variable or the GitHub runner.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Time allowed for the GitHub runner to answer.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

const GITHUB_URL_VAR: &str = "ACTIONS_ID_TOKEN_REQUEST_URL";
const GITHUB_TOKEN_VAR: &str = "ACTIONS_ID_TOKEN_REQUEST_TOKEN";

/// Why evidence could not be gathered.
#[derive(Debug, thiserror::Error)]
pub enum EvidenceError {
    /// The evidence named is missing or malformed.
    #[error("{0}")]
    Invalid(String),
    /// The CI runner did not hand out a token.
    #[error("{0}")]
    Unavailable(String),
}

/// Where evidence comes from, as [`EvidenceOptions::resolve`] looks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvidenceOptions {
    /// A single-use join token.
    pub join_token: Option<Secret<String>>,
    /// A file holding a JWT to present.
    pub token_file: Option<PathBuf>,
    /// The name of the variable holding a GitLab `id_tokens` token.
    pub gitlab_id_token_var: Option<String>,
    /// Audience of the ID token requested from GitHub Actions.
    pub oidc_audience: String,
    /// The projected Kubernetes token, used when it exists.
    pub k8s_token_file: PathBuf,
    /// Look in the environment (GitHub Actions, GitLab CI, Kubernetes).
    pub ambient: bool,
}

impl Default for EvidenceOptions {
    fn default() -> Self {
        Self {
            join_token: None,
            token_file: None,
            gitlab_id_token_var: None,
            oidc_audience: DEFAULT_OIDC_AUDIENCE.to_owned(),
            k8s_token_file: PathBuf::from(DEFAULT_K8S_TOKEN_FILE),
            ambient: true,
        }
    }
}

/// Where a piece of evidence came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A join token.
    JoinToken,
    /// A token file.
    TokenFile(PathBuf),
    /// A GitLab `id_tokens` variable.
    GitLab(String),
    /// The GitHub Actions ID token service.
    GitHubActions,
    /// A projected Kubernetes service-account token.
    Kubernetes(PathBuf),
    /// Only the Unix socket peer credentials.
    UnixPeer,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::JoinToken => f.write_str("join token"),
            Self::TokenFile(p) => write!(f, "token file {}", p.display()),
            Self::GitLab(var) => write!(f, "GitLab ID token ${var}"),
            Self::GitHubActions => f.write_str("GitHub Actions ID token"),
            Self::Kubernetes(p) => write!(f, "Kubernetes token {}", p.display()),
            Self::UnixPeer => f.write_str("Unix socket peer credentials"),
        }
    }
}

/// Evidence ready to attach to requests.
#[derive(Debug, Clone)]
pub struct Evidence {
    source: Source,
    header: Option<(&'static str, Secret<String>)>,
}

impl Evidence {
    /// Where it came from.
    pub fn source(&self) -> &Source {
        &self.source
    }

    /// A bearer token (OIDC/JWT) as evidence.
    pub fn bearer(source: Source, token: &str) -> Result<Self, EvidenceError> {
        Self::with_header(source, "authorization", format!("Bearer {}", token.trim()))
    }

    fn with_header(
        source: Source,
        name: &'static str,
        value: String,
    ) -> Result<Self, EvidenceError> {
        if value.len() > MAX_TOKEN_BYTES + 16
            || value.parse::<tonic::metadata::MetadataValue<_>>().is_err()
        {
            return Err(EvidenceError::Invalid(format!(
                "{source}: not a valid token (over {MAX_TOKEN_BYTES} bytes or not printable ASCII)"
            )));
        }
        Ok(Self {
            source,
            header: Some((name, Secret::new(value))),
        })
    }

    /// Adds this evidence to `req`.
    pub fn apply<T>(&self, req: &mut tonic::Request<T>) {
        if let Some((name, value)) = &self.header
            && let Ok(v) = value.expose().parse()
        {
            req.metadata_mut().insert(*name, v);
        }
    }

    /// `msg` in a request carrying this evidence.
    pub fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        self.apply(&mut req);
        req
    }
}

impl EvidenceOptions {
    /// Finds evidence in the order the module documents.
    pub async fn resolve(&self) -> Result<Evidence, EvidenceError> {
        self.resolve_with(&|k| std::env::var(k).ok()).await
    }

    /// [`Self::resolve`] with the environment read through `env`.
    pub async fn resolve_with(
        &self,
        env: &(dyn Fn(&str) -> Option<String> + Sync),
    ) -> Result<Evidence, EvidenceError> {
        if let Some(t) = &self.join_token {
            return Evidence::with_header(
                Source::JoinToken,
                crate::attest::join_token::METADATA_KEY,
                t.expose().trim().to_owned(),
            );
        }
        if let Some(path) = &self.token_file {
            let token = read_token_file(path)?;
            return Evidence::bearer(Source::TokenFile(path.clone()), &token);
        }
        if let Some(var) = &self.gitlab_id_token_var {
            let token = env(var).filter(|t| !t.trim().is_empty()).ok_or_else(|| {
                EvidenceError::Invalid(format!(
                    "--gitlab-id-token: ${var} is not set; declare it under the job's id_tokens:"
                ))
            })?;
            return Evidence::bearer(Source::GitLab(var.clone()), &token);
        }
        if !self.ambient {
            return Ok(unix_peer());
        }
        if let (Some(url), Some(bearer)) = (env(GITHUB_URL_VAR), env(GITHUB_TOKEN_VAR)) {
            let token = github_id_token(&url, &bearer, &self.oidc_audience).await?;
            return Evidence::bearer(Source::GitHubActions, &token);
        }
        if env("GITLAB_CI").is_some()
            && let Some(token) = env(GITLAB_AMBIENT_VAR).filter(|t| !t.trim().is_empty())
        {
            return Evidence::bearer(Source::GitLab(GITLAB_AMBIENT_VAR.to_owned()), &token);
        }
        if self.k8s_token_file.exists() {
            let token = read_token_file(&self.k8s_token_file)?;
            return Evidence::bearer(Source::Kubernetes(self.k8s_token_file.clone()), &token);
        }
        Ok(unix_peer())
    }
}

/// Evidence reused for a short while, for clients that make many calls in a row (`ephemera run`:
/// begin, mints, keep-alive, renewals, end): one CI token fetch serves them all, and the
/// broker's verification cache keeps hitting. Shared between tasks.
#[derive(Debug, Clone)]
pub struct EvidenceCache {
    options: EvidenceOptions,
    max_age: Duration,
    cached: std::sync::Arc<tokio::sync::Mutex<Option<(std::time::Instant, Evidence)>>>,
}

impl EvidenceCache {
    /// Reuses evidence from `options` for up to `max_age`.
    pub fn new(options: EvidenceOptions, max_age: Duration) -> Self {
        Self {
            options,
            max_age,
            cached: std::sync::Arc::default(),
        }
    }

    /// Fresh enough evidence: the cached one, or newly gathered.
    pub async fn get(&self) -> Result<Evidence, EvidenceError> {
        let mut cached = self.cached.lock().await;
        if let Some((at, ev)) = cached.as_ref()
            && at.elapsed() < self.max_age
        {
            return Ok(ev.clone());
        }
        let ev = self.options.resolve().await?;
        *cached = Some((std::time::Instant::now(), ev.clone()));
        Ok(ev)
    }
}

fn unix_peer() -> Evidence {
    Evidence {
        source: Source::UnixPeer,
        header: None,
    }
}

fn read_token_file(path: &Path) -> Result<String, EvidenceError> {
    let invalid =
        |why: String| EvidenceError::Invalid(format!("token file {}: {why}", path.display()));
    let meta = std::fs::metadata(path).map_err(|e| invalid(e.to_string()))?;
    if meta.len() > MAX_TOKEN_BYTES as u64 {
        return Err(invalid(format!("over {MAX_TOKEN_BYTES} bytes")));
    }
    let token = std::fs::read_to_string(path).map_err(|e| invalid(e.to_string()))?;
    if token.trim().is_empty() {
        return Err(invalid("empty".into()));
    }
    Ok(token)
}

/// Asks the GitHub Actions runner for an ID token with audience `aud`.
async fn github_id_token(url: &str, bearer: &str, aud: &str) -> Result<String, EvidenceError> {
    let sep = if url.contains('?') { '&' } else { '?' };
    let full = format!("{url}{sep}audience={}", percent_encode(aud));
    let auth = format!("Bearer {}", bearer.trim())
        .parse()
        .map_err(|_| EvidenceError::Invalid(format!("${GITHUB_TOKEN_VAR} is not valid text")))?;
    let unavailable = |why: String| {
        EvidenceError::Unavailable(format!(
            "GitHub Actions ID token: {why}; does the job have `permissions: id-token: write`?"
        ))
    };
    let body = tokio::time::timeout(
        FETCH_TIMEOUT,
        crate::httpc::get(
            &full,
            None,
            &[(http::header::AUTHORIZATION, auth)],
            MAX_TOKEN_BYTES * 2,
        ),
    )
    .await
    .map_err(|_| unavailable("the runner did not answer in time".into()))?
    .map_err(unavailable)?;
    #[derive(serde::Deserialize)]
    struct Reply {
        value: String,
    }
    let reply: Reply =
        serde_json::from_slice(&body).map_err(|e| unavailable(format!("unexpected reply: {e}")))?;
    Ok(reply.value)
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + Sync + use<> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn no_k8s() -> EvidenceOptions {
        EvidenceOptions {
            k8s_token_file: PathBuf::from("/nonexistent/ephemera-token"),
            ..EvidenceOptions::default()
        }
    }

    #[tokio::test]
    async fn precedence() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "file.token.sig\n").unwrap();
        let k8s = dir.path().join("k8s");
        std::fs::write(&k8s, "k8s.token.sig").unwrap();
        let gitlab = env_of(&[("GITLAB_CI", "true"), (GITLAB_AMBIENT_VAR, "gl.token.sig")]);

        let explicit = EvidenceOptions {
            token_file: Some(file.clone()),
            k8s_token_file: k8s.clone(),
            ..EvidenceOptions::default()
        };
        let ev = explicit.resolve_with(&gitlab).await.unwrap();
        assert_eq!(ev.source(), &Source::TokenFile(file));
        let mut req = ev.request(());
        assert_eq!(
            req.metadata_mut().get("authorization").unwrap(),
            "Bearer file.token.sig"
        );

        let ambient = EvidenceOptions {
            k8s_token_file: k8s.clone(),
            ..EvidenceOptions::default()
        };
        let ev = ambient.resolve_with(&gitlab).await.unwrap();
        assert_eq!(ev.source(), &Source::GitLab(GITLAB_AMBIENT_VAR.into()));
        let ev = ambient.resolve_with(&env_of(&[])).await.unwrap();
        assert_eq!(ev.source(), &Source::Kubernetes(k8s.clone()));

        let off = EvidenceOptions {
            ambient: false,
            k8s_token_file: k8s,
            ..EvidenceOptions::default()
        };
        let ev = off.resolve_with(&gitlab).await.unwrap();
        assert_eq!(ev.source(), &Source::UnixPeer);
        assert!(ev.request(()).metadata().is_empty());
    }

    #[tokio::test]
    async fn explicit_sources_fail_loudly() {
        let named = EvidenceOptions {
            gitlab_id_token_var: Some("DEPLOY_ID_TOKEN".into()),
            ..no_k8s()
        };
        let err = named.resolve_with(&env_of(&[])).await.unwrap_err();
        assert!(
            err.to_string().contains("$DEPLOY_ID_TOKEN is not set"),
            "{err}"
        );

        let missing = EvidenceOptions {
            token_file: Some("/nonexistent/token".into()),
            ..no_k8s()
        };
        assert!(matches!(
            missing.resolve_with(&env_of(&[])).await,
            Err(EvidenceError::Invalid(_))
        ));

        let bad = EvidenceOptions {
            join_token: Some(Secret::new("bad\ntoken".into())),
            ..no_k8s()
        };
        assert!(bad.resolve_with(&env_of(&[])).await.is_err());
    }

    #[tokio::test]
    async fn github_runner_unreachable_is_unavailable() {
        let env = env_of(&[
            (GITHUB_URL_VAR, "http://127.0.0.1:1/token?api-version=2.0"),
            (GITHUB_TOKEN_VAR, "runner-secret"),
        ]);
        let err = no_k8s().resolve_with(&env).await.unwrap_err();
        assert!(matches!(err, EvidenceError::Unavailable(_)), "{err}");
        assert!(err.to_string().contains("id-token: write"), "{err}");
        assert!(!err.to_string().contains("runner-secret"), "{err}");
    }

    #[tokio::test]
    async fn the_cache_reuses_evidence_until_it_is_too_old() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "first.token.sig").unwrap();
        let options = EvidenceOptions {
            token_file: Some(file.clone()),
            ..no_k8s()
        };
        let header = |ev: Evidence| {
            ev.request(())
                .metadata()
                .get("authorization")
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned()
        };
        let reused = EvidenceCache::new(options.clone(), Duration::from_secs(3600));
        let fresh = EvidenceCache::new(options, Duration::ZERO);
        assert_eq!(
            header(reused.get().await.unwrap()),
            "Bearer first.token.sig"
        );
        std::fs::write(&file, "second.token.sig").unwrap();
        assert_eq!(
            header(reused.get().await.unwrap()),
            "Bearer first.token.sig"
        );
        assert_eq!(
            header(fresh.get().await.unwrap()),
            "Bearer second.token.sig"
        );
    }

    #[test]
    fn encodes_audiences() {
        assert_eq!(
            percent_encode("https://deploy.example.com/a b"),
            "https%3A%2F%2Fdeploy.example.com%2Fa%20b"
        );
    }
}
