//! `ephemera.v1.Admin`: operator actions. Deny by default: a call without the admin token (from
//! the 0600 admin token file) gets `PermissionDenied`, and is audited like every admin action.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SecureRandom;
use tonic::{Request, Response, Status};

use super::pb::v1::{
    CreateJoinTokenRequest, CreateJoinTokenResponse, CreateLockRequest, CreateLockResponse,
    DeleteLockRequest, DeleteLockResponse, GetIntermediateCsrRequest, GetIntermediateCsrResponse,
    GetLeaseRequest, LeaseInfo, ListLeasesRequest, ListLeasesResponse, ListLocksRequest,
    ListLocksResponse, ListSigningKeysRequest, ListSigningKeysResponse, ListTasksRequest,
    ListTasksResponse, LockInfo, ReloadPolicyRequest, ReloadPolicyResponse, RevokeIdentityRequest,
    RevokeLeaseRequest, RevokeResponse, RevokeSigningKeyRequest, RevokeSigningKeyResponse,
    RevokeTaskRequest, RotateSigningKeyRequest, SigningKeyInfo, StageIntermediateRequest, TaskInfo,
    admin_server,
};
use super::status::to_status;
use crate::attest::shown;
use crate::attest::x509pop::{ClientCas, X509PopAttestor};
use crate::broker::trust::LockTarget;
use crate::broker::{Broker, BrokerError};
use crate::ca::CaError;
pub use crate::ca::keys::load_or_create_secret;
use crate::id::{SpiffeId, Ttl};
use crate::store::{LeaseStatus, ListFilter, Task};

/// Default page size of listings.
pub const DEFAULT_PAGE: u32 = 100;
/// Largest page size of listings.
pub const MAX_PAGE: u32 = 1000;

/// Page tokens: the last id of a page, authenticated with a key shared by every broker of the CA
/// so a tampered or forged token is refused rather than silently listing something else, and a
/// page from one replica continues on another.
struct PageTokens {
    key: ring::hmac::Key,
}

impl PageTokens {
    /// Page tokens keyed from `secret` with HKDF-SHA256 (a key of their own, so the secret
    /// could serve other purposes under other labels).
    fn new(secret: &[u8]) -> Self {
        let salt = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"ephemera admin");
        let key = salt
            .extract(secret)
            .expand(&[b"page tokens v1"], ring::hmac::HMAC_SHA256)
            .map(ring::hmac::Key::from)
            // One 32-byte output of SHA-256's HKDF cannot exceed its limit (255 blocks).
            .unwrap_or_else(|_| ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret));
        Self { key }
    }

    fn issue(&self, scope: &str, last_id: &str) -> String {
        let tag = ring::hmac::sign(&self.key, format!("{scope}\n{last_id}").as_bytes());
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(last_id),
            URL_SAFE_NO_PAD.encode(&tag.as_ref()[..16])
        )
    }

    fn open(&self, scope: &str, token: &str) -> Result<Option<String>, Status> {
        if token.is_empty() {
            return Ok(None);
        }
        let invalid = || Status::invalid_argument("invalid page token");
        let (id, tag) = token.split_once('.').ok_or_else(invalid)?;
        let id = String::from_utf8(URL_SAFE_NO_PAD.decode(id).map_err(|_| invalid())?)
            .map_err(|_| invalid())?;
        let tag = URL_SAFE_NO_PAD.decode(tag).map_err(|_| invalid())?;
        let full = ring::hmac::sign(&self.key, format!("{scope}\n{id}").as_bytes());
        // Constant-time comparison of the truncated tag.
        let ok = tag.len() == 16
            && tag
                .iter()
                .zip(&full.as_ref()[..16])
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if ok { Ok(Some(id)) } else { Err(invalid()) }
    }
}

fn page_size(n: u32) -> Result<u32, Status> {
    match n {
        0 => Ok(DEFAULT_PAGE),
        1..=MAX_PAGE => Ok(n),
        _ => Err(Status::invalid_argument(format!(
            "page_size must be at most {MAX_PAGE}"
        ))),
    }
}

/// States a task listing can be filtered by: every state it shows, and `inactive`.
const TASK_STATES: &[&str] = &["active", "inactive", "ended", "expired", "revoked"];

/// States a lease listing can be filtered by: every state it shows, and `inactive`.
const LEASE_STATES: &[&str] = &[
    "active",
    "inactive",
    "revoked",
    "expired",
    "task_ended",
    "task_expired",
    "task_revoked",
];

fn state_filter(s: &str, states: &[&str]) -> Result<Option<String>, Status> {
    if s.is_empty() {
        return Ok(None);
    }
    if states.contains(&s) {
        return Ok(Some(s.to_owned()));
    }
    Err(Status::invalid_argument(format!(
        "invalid state {:?}: use one of {}",
        crate::attest::shown(s),
        states.join(", ")
    )))
}

fn spiffe_filter(s: &str) -> Result<Option<String>, Status> {
    if s.is_empty() {
        return Ok(None);
    }
    s.parse::<SpiffeId>()
        .map(|id| Some(id.to_string()))
        .map_err(|e| Status::invalid_argument(format!("invalid spiffe_id: {e}")))
}

fn id_filter(s: &str, field: &str) -> Result<Option<String>, Status> {
    if s.is_empty() {
        return Ok(None);
    }
    // Ids are UUIDs; serials are hex, possibly with the colons tools print.
    if s.len() > 64
        || !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b':')
    {
        return Err(Status::invalid_argument(format!("invalid {field}")));
    }
    Ok(Some(s.to_owned()))
}

fn task_info(t: Task) -> TaskInfo {
    TaskInfo {
        id: t.id,
        spiffe_id: t.spiffe_id,
        attestor: t.attestor,
        labels: t.labels.into_iter().collect(),
        created_at: t.created_at,
        deadline: t.deadline,
        due_at: t.due_at,
        state: t.state.as_str().to_owned(),
        ended_at: t.ended_at.unwrap_or(0),
        reason: t.reason.unwrap_or_default(),
    }
}

fn lease_info(s: LeaseStatus, now: i64) -> LeaseInfo {
    let active = s.active(now);
    let state = if s.lease.revoked {
        "revoked".to_owned()
    } else if s.lease.expires_at <= now {
        "expired".to_owned()
    } else if let Some(ts) = s
        .task_state
        .filter(|t| *t != crate::store::TaskState::Active)
    {
        format!("task_{}", ts.as_str())
    } else {
        "active".to_owned()
    };
    let l = s.lease;
    LeaseInfo {
        id: l.id,
        task_id: l.task_id.unwrap_or_default(),
        kind: l.kind.as_str().to_owned(),
        serial: l.serial.unwrap_or_default(),
        spiffe_id: l.spiffe_id,
        audience: l.audience,
        issued_at: l.issued_at,
        expires_at: l.expires_at,
        active,
        state,
        revoked_at: l.revoked_at.unwrap_or(0),
        reason: l.reason.unwrap_or_default(),
    }
}

/// Default join token lifetime.
pub const DEFAULT_JOIN_TOKEN_TTL: u64 = 3600;
/// Longest join token lifetime.
pub const MAX_JOIN_TOKEN_TTL: u64 = 7 * 86_400;
/// Most extra claims on a join token.
pub const MAX_JOIN_TOKEN_CLAIMS: usize = 32;

/// Creates an admin token file (mode 0600) unless one exists.
pub fn create_token_file(path: &Path) -> Result<bool, CaError> {
    if path.exists() {
        return Ok(false);
    }
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| CaError::Generate("random number generator failed".into()))?;
    let token = format!("eat_{}\n", URL_SAFE_NO_PAD.encode(bytes));
    let io = |source| CaError::Io {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    f.write_all(token.as_bytes()).map_err(io)?;
    Ok(true)
}

/// Who may call the Admin API, and the key of its page tokens.
pub struct AdminAuth {
    /// The accepted tokens' hashes, re-read when the file changes.
    tokens: std::sync::RwLock<AdminTokens>,
    token_file: PathBuf,
    pages: PageTokens,
    /// SPIFFE IDs whose X.509-SVIDs (from this broker's CA, over mTLS) are admins.
    spiffe_ids: Vec<String>,
    svids: Option<X509PopAttestor>,
}

fn sha256(b: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, b).as_ref());
    out
}

impl AdminAuth {
    /// Loads the admin token file and the admin SPIFFE IDs. Admin SVIDs must chain to
    /// `own_roots` (this broker's CA). A missing token file and no SPIFFE IDs disable the Admin
    /// API; a token file readable by group or others refuses to start.
    pub fn load(
        token_file: &Path,
        pages_key_file: &Path,
        spiffe_ids: Vec<String>,
        own_roots: &[Vec<u8>],
        clock: Arc<dyn crate::clock::Clock>,
    ) -> Result<Self, CaError> {
        let page_secret = load_or_create_secret(pages_key_file)?;
        let page_key = page_secret.expose().as_slice();
        let svids = if spiffe_ids.is_empty() {
            None
        } else {
            let cas = ClientCas::from_der(own_roots).map_err(|reason| CaError::Invalid {
                path: PathBuf::from(crate::ca::keys::ROOT_CERT),
                reason,
            })?;
            Some(X509PopAttestor::new(cas, clock))
        };
        if !token_file.exists() {
            if spiffe_ids.is_empty() {
                tracing::warn!(file = %token_file.display(), "no admin token file and no admin.spiffe_ids: the Admin API is disabled");
            }
            return Ok(Self {
                tokens: std::sync::RwLock::new(AdminTokens::default()),
                token_file: token_file.to_owned(),
                pages: PageTokens::new(page_key),
                spiffe_ids,
                svids,
            });
        }
        let tokens = AdminTokens::read(token_file)?;
        Ok(Self {
            tokens: std::sync::RwLock::new(tokens),
            token_file: token_file.to_owned(),
            pages: PageTokens::new(page_key),
            spiffe_ids,
            svids,
        })
    }

    /// The accepted token hashes, re-read first if the file changed (a rotation takes effect
    /// on the next admin call, without a restart). A changed file that is not valid is refused
    /// with a logged error, and the tokens in force keep working.
    fn token_hashes(&self) -> Vec<[u8; 32]> {
        let stamp = file_stamp(&self.token_file);
        let current = self
            .tokens
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        if stamp == current.stamp || stamp.is_none() && current.hashes.is_empty() {
            return current.hashes;
        }
        match AdminTokens::read(&self.token_file) {
            Ok(fresh) => {
                tracing::info!(file = %self.token_file.display(), tokens = fresh.hashes.len(), "admin token file re-read");
                let hashes = fresh.hashes.clone();
                *self
                    .tokens
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = fresh;
                hashes
            }
            Err(e) => {
                tracing::error!(file = %self.token_file.display(), error = %e, "admin token file changed but is not valid; the tokens in force keep working");
                let mut tokens = self
                    .tokens
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                tokens.stamp = stamp;
                tokens.hashes.clone()
            }
        }
    }

    /// The admin SPIFFE ID of an mTLS client certificate, if it is one.
    fn svid_admin<T>(&self, request: &Request<T>) -> Option<String> {
        let verifier = self.svids.as_ref()?;
        let chain = request.peer_certs()?;
        let identity = verifier.verify(&chain).ok()?;
        match identity
            .claims
            .get("san_uri")
            .and_then(serde_json::Value::as_array)
        {
            Some(uris) if uris.len() == 1 => uris[0]
                .as_str()
                .filter(|u| self.spiffe_ids.iter().any(|a| a == u))
                .map(str::to_owned),
            _ => None,
        }
    }

    /// Whether the Admin API can be used at all.
    pub fn enabled(&self) -> bool {
        !self.token_hashes().is_empty() || !self.spiffe_ids.is_empty()
    }

    /// The admin identity of a request (`admin-token` or the admin's SPIFFE ID), or
    /// `PermissionDenied`.
    pub fn check<T>(&self, request: &Request<T>, action: &str) -> Result<String, Status> {
        let source = request.remote_addr().map(|a| a.to_string());
        if let Some(id) = self.svid_admin(request) {
            return Ok(id);
        }
        let accepted = self.token_hashes();
        if accepted.is_empty() {
            let reason = if self.enabled() {
                "no admin credential"
            } else {
                "admin API disabled"
            };
            tracing::info!(target: "ephemera::audit", action, decision = "deny", reason, source = source.as_deref(), "admin action");
            return Err(Status::permission_denied(if self.enabled() {
                "admin credential required".to_owned()
            } else {
                format!(
                    "the Admin API is disabled: no admin token file at {}",
                    self.token_file.display()
                )
            }));
        }
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| sha256(t.trim().as_bytes()));
        // Hashes are compared, so timing reveals nothing about the tokens.
        match presented.and_then(|p| accepted.iter().position(|a| *a == p)) {
            Some(0) => Ok("admin-token".to_owned()),
            Some(_) => Ok("admin-token (previous)".to_owned()),
            None => {
                tracing::info!(target: "ephemera::audit", action, decision = "deny", reason = "no admin credential", source = source.as_deref(), "admin action");
                Err(Status::permission_denied("admin credential required"))
            }
        }
    }
}

/// Modification time, size and inode of a file, to notice it was replaced.
fn file_stamp(path: &Path) -> Option<(std::time::SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// The admin tokens accepted: the file's first line, and during a rotation's overlap the
/// previous token on its second line.
#[derive(Debug, Clone, Default)]
struct AdminTokens {
    stamp: Option<(std::time::SystemTime, u64, u64)>,
    hashes: Vec<[u8; 32]>,
}

impl AdminTokens {
    /// Reads the token file: mode 0600, one or two tokens of at least 32 characters.
    fn read(path: &Path) -> Result<Self, CaError> {
        let stamp = file_stamp(path);
        crate::ca::keys::check_key_mode(path)?;
        let text = std::fs::read_to_string(path).map_err(|source| CaError::Io {
            path: path.to_owned(),
            source,
        })?;
        let tokens = admin_tokens(&text);
        let invalid = |reason: &str| CaError::Invalid {
            path: path.to_owned(),
            reason: reason.into(),
        };
        if tokens.is_empty() || tokens.len() > 2 {
            return Err(invalid(
                "the admin token file must hold one token, or two during a rotation (the new one first)",
            ));
        }
        if tokens.iter().any(|t| t.len() < 32) {
            return Err(invalid("admin token is shorter than 32 characters"));
        }
        Ok(Self {
            stamp,
            hashes: tokens.iter().map(|t| sha256(t.as_bytes())).collect(),
        })
    }
}

/// The tokens of an admin token file's text: its non-empty lines, trimmed.
pub fn admin_tokens(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect()
}

/// Ends a rotation's overlap: keeps only the file's first (new) token. Returns whether a
/// previous token was dropped.
pub fn finish_token_rotation(path: &Path) -> Result<bool, CaError> {
    let io = |source| CaError::Io {
        path: path.to_owned(),
        source,
    };
    let text = std::fs::read_to_string(path).map_err(io)?;
    let tokens = admin_tokens(&text);
    let Some(current) = tokens.first() else {
        return Err(CaError::Invalid {
            path: path.to_owned(),
            reason: "the admin token file is empty".into(),
        });
    };
    if tokens.len() == 1 {
        return Ok(false);
    }
    write_secret(path, &format!("{current}\n"))?;
    Ok(true)
}

/// Replaces a secret file atomically (mode 0600).
fn write_secret(path: &Path, text: &str) -> Result<(), CaError> {
    let io = |source| CaError::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// Writes a new admin token to `path` (replacing the file atomically, mode 0600), keeping the
/// current one as the second line when `keep_previous`, so clients holding it keep working
/// until the next rotation. Returns the new token.
pub fn rotate_token_file(path: &Path, keep_previous: bool) -> Result<String, CaError> {
    let io = |source| CaError::Io {
        path: path.to_owned(),
        source,
    };
    let previous = match std::fs::read_to_string(path) {
        Ok(text) => admin_tokens(&text).first().map(|t| (*t).to_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io(e)),
    };
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| CaError::Generate("random number generator failed".into()))?;
    let token = format!("eat_{}", URL_SAFE_NO_PAD.encode(bytes));
    let mut text = format!("{token}\n");
    if keep_previous && let Some(p) = previous {
        text.push_str(&p);
        text.push('\n');
    }
    write_secret(path, &text)?;
    Ok(token)
}

/// The `Admin` gRPC service.
pub struct AdminService {
    broker: Arc<Broker>,
    auth: Arc<AdminAuth>,
}

impl AdminService {
    /// A service over `broker`, guarded by `auth`.
    pub fn new(broker: Arc<Broker>, auth: Arc<AdminAuth>) -> Self {
        Self { broker, auth }
    }
}

fn bad(field: &'static str, reason: impl Into<String>) -> BrokerError {
    BrokerError::BadRequest {
        field,
        reason: reason.into(),
    }
}

fn valid_word(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

#[tonic::async_trait]
impl admin_server::Admin for AdminService {
    async fn list_tasks(
        &self,
        request: Request<ListTasksRequest>,
    ) -> Result<Response<ListTasksResponse>, Status> {
        self.auth.check(&request, "ListTasks")?;
        let req = request.into_inner();
        let limit = page_size(req.page_size)?;
        let filter = ListFilter {
            task_id: None,
            spiffe_id: spiffe_filter(&req.spiffe_id)?,
            state: state_filter(&req.state, TASK_STATES)?,
            after: self.auth.pages.open("tasks", &req.page_token)?,
            limit,
        };
        let now = self.broker.clock().unix_now();
        let tasks = self
            .broker
            .store()
            .list_tasks(filter, now)
            .await
            .map_err(|e| to_status(&e.into()))?;
        let next_page_token = match tasks.last() {
            Some(t) if tasks.len() == limit as usize => self.auth.pages.issue("tasks", &t.id),
            _ => String::new(),
        };
        Ok(Response::new(ListTasksResponse {
            tasks: tasks.into_iter().map(task_info).collect(),
            next_page_token,
        }))
    }

    async fn list_leases(
        &self,
        request: Request<ListLeasesRequest>,
    ) -> Result<Response<ListLeasesResponse>, Status> {
        self.auth.check(&request, "ListLeases")?;
        let req = request.into_inner();
        let limit = page_size(req.page_size)?;
        let filter = ListFilter {
            task_id: id_filter(&req.task_id, "task_id")?,
            spiffe_id: spiffe_filter(&req.spiffe_id)?,
            state: state_filter(&req.state, LEASE_STATES)?,
            after: self.auth.pages.open("leases", &req.page_token)?,
            limit,
        };
        let now = self.broker.clock().unix_now();
        let leases = self
            .broker
            .store()
            .list_leases(filter, now)
            .await
            .map_err(|e| to_status(&e.into()))?;
        let next_page_token = match leases.last() {
            Some(l) if leases.len() == limit as usize => {
                self.auth.pages.issue("leases", &l.lease.id)
            }
            _ => String::new(),
        };
        Ok(Response::new(ListLeasesResponse {
            leases: leases.into_iter().map(|l| lease_info(l, now)).collect(),
            next_page_token,
        }))
    }

    async fn get_lease(
        &self,
        request: Request<GetLeaseRequest>,
    ) -> Result<Response<LeaseInfo>, Status> {
        self.auth.check(&request, "GetLease")?;
        let id = request.into_inner().id;
        let key =
            id_filter(&id, "id")?.ok_or_else(|| Status::invalid_argument("id is required"))?;
        let now = self.broker.clock().unix_now();
        match self
            .broker
            .lease_status(&key)
            .await
            .map_err(|e| to_status(&e))?
        {
            Some(s) => Ok(Response::new(lease_info(s, now))),
            None => Err(Status::not_found(format!("unknown lease {key}"))),
        }
    }

    async fn revoke_lease(
        &self,
        request: Request<RevokeLeaseRequest>,
    ) -> Result<Response<RevokeResponse>, Status> {
        let admin = self.auth.check(&request, "RevokeLease")?;
        let id = request.into_inner().id;
        let key =
            id_filter(&id, "id")?.ok_or_else(|| Status::invalid_argument("id is required"))?;
        let done = self
            .broker
            .revoke_lease(&admin, &key)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(RevokeResponse {
            already_revoked: !done,
            credentials_revoked: u64::from(done),
            ..RevokeResponse::default()
        }))
    }

    async fn revoke_task(
        &self,
        request: Request<RevokeTaskRequest>,
    ) -> Result<Response<RevokeResponse>, Status> {
        let admin = self.auth.check(&request, "RevokeTask")?;
        let id = request.into_inner().task_id;
        let key = id_filter(&id, "task_id")?
            .ok_or_else(|| Status::invalid_argument("task_id is required"))?;
        let done = self
            .broker
            .revoke_task(&admin, &key)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(RevokeResponse {
            already_revoked: !done,
            task_ids: if done { vec![key] } else { Vec::new() },
            ..RevokeResponse::default()
        }))
    }

    async fn revoke_identity(
        &self,
        request: Request<RevokeIdentityRequest>,
    ) -> Result<Response<RevokeResponse>, Status> {
        let admin = self.auth.check(&request, "RevokeIdentity")?;
        let raw = request.into_inner().spiffe_id;
        let id: SpiffeId = raw
            .parse()
            .map_err(|e| Status::invalid_argument(format!("invalid spiffe_id: {e}")))?;
        let revoked = self
            .broker
            .revoke_identity(&admin, &id)
            .await
            .map_err(|e| to_status(&e))?;
        Ok(Response::new(match revoked {
            Some(r) => RevokeResponse {
                already_revoked: false,
                task_ids: r.task_ids,
                credentials_revoked: r.leases,
                cursor: u64::try_from(r.event.seq).unwrap_or(0),
            },
            None => RevokeResponse {
                already_revoked: true,
                ..RevokeResponse::default()
            },
        }))
    }

    async fn reload_policy(
        &self,
        request: Request<ReloadPolicyRequest>,
    ) -> Result<Response<ReloadPolicyResponse>, Status> {
        let admin = self.auth.check(&request, "ReloadPolicy")?;
        let broker = self.broker.clone();
        let result = tokio::task::spawn_blocking(move || broker.policy().reload())
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        tracing::info!(target: "ephemera::audit", action = "ReloadPolicy", admin = %admin, decision = "allow", outcome = if result.is_ok() { "reloaded" } else { "refused" }, "admin action");
        match result {
            Ok(n) => {
                // Returns once the new policies serve and every live credential has been
                // decided again under them.
                let r = self
                    .broker
                    .redecide_policy()
                    .await
                    .map_err(|e| to_status(&e))?;
                let (tasks_revoked, credentials_revoked, cursor) = match r.revoked {
                    Some(v) => (
                        v.task_ids,
                        v.leases,
                        u64::try_from(v.event.seq).unwrap_or(0),
                    ),
                    None => (Vec::new(), 0, 0),
                };
                Ok(Response::new(ReloadPolicyResponse {
                    policies: u32::try_from(n).unwrap_or(u32::MAX),
                    tasks_decided: r.tasks_decided,
                    grants_decided: r.grants_decided,
                    credentials_decided: r.leases_decided,
                    tasks_revoked,
                    credentials_revoked,
                    cursor,
                    redecide_ms: u64::try_from(r.elapsed.as_millis()).unwrap_or(u64::MAX),
                }))
            }
            Err(problems) => Err(Status::failed_precondition(format!(
                "policies not reloaded; the previous ones keep serving:\n{}",
                problems
                    .iter()
                    .map(|p| format!("  {p}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            ))),
        }
    }

    async fn create_lock(
        &self,
        request: Request<CreateLockRequest>,
    ) -> Result<Response<CreateLockResponse>, Status> {
        let admin = self.auth.check(&request, "CreateLock")?;
        let req = request.into_inner();
        let target = LockTarget::parse(&req.target)
            .map_err(|e| Status::invalid_argument(format!("invalid target: {e}")))?;
        let now = self.broker.clock().unix_now();
        let expires_at = match req.ttl_seconds {
            None => None,
            Some(0) => {
                return Err(Status::invalid_argument(
                    "invalid ttl_seconds: must be positive",
                ));
            }
            Some(t) => Some(now.saturating_add(i64::try_from(t).unwrap_or(i64::MAX))),
        };
        let result = self
            .broker
            .create_lock(target, &req.reason, expires_at, &admin)
            .await;
        match &result {
            Ok(c) => {
                tracing::info!(target: "ephemera::audit", action = "CreateLock", admin = %admin, decision = "allow", lock_id = %c.lock.id, lock_target = ?c.lock.target, tasks = c.revoked.task_ids.len(), credentials = c.revoked.leases, "admin action")
            }
            Err(e) => {
                tracing::info!(target: "ephemera::audit", action = "CreateLock", admin = %admin, decision = "deny", reason = %e, "admin action")
            }
        }
        let c = result.map_err(|e| to_status(&e))?;
        Ok(Response::new(CreateLockResponse {
            lock: Some(lock_info(&c.lock, now)),
            task_ids: c.revoked.task_ids,
            credentials_revoked: c.revoked.leases,
            cursor: u64::try_from(c.revoked.event.seq).unwrap_or(0),
        }))
    }

    async fn list_locks(
        &self,
        request: Request<ListLocksRequest>,
    ) -> Result<Response<ListLocksResponse>, Status> {
        self.auth.check(&request, "ListLocks")?;
        let now = self.broker.clock().unix_now();
        let locks = self.broker.list_locks().await.map_err(|e| to_status(&e))?;
        Ok(Response::new(ListLocksResponse {
            locks: locks.iter().map(|l| lock_info(l, now)).collect(),
        }))
    }

    async fn delete_lock(
        &self,
        request: Request<DeleteLockRequest>,
    ) -> Result<Response<DeleteLockResponse>, Status> {
        let admin = self.auth.check(&request, "DeleteLock")?;
        let id = request.into_inner().id;
        if id.is_empty() || id.len() > 64 {
            return Err(Status::invalid_argument("invalid id: must be a lock id"));
        }
        let deleted = self
            .broker
            .delete_lock(&id)
            .await
            .map_err(|e| to_status(&e))?;
        tracing::info!(target: "ephemera::audit", action = "DeleteLock", admin = %admin, decision = "allow", lock_id = ?shown(&id), deleted, "admin action");
        Ok(Response::new(DeleteLockResponse { deleted }))
    }

    async fn list_signing_keys(
        &self,
        request: Request<ListSigningKeysRequest>,
    ) -> Result<Response<ListSigningKeysResponse>, Status> {
        self.auth.check(&request, "ListSigningKeys")?;
        let keys = self.broker.key_status().await.map_err(|e| key_status(&e))?;
        let set = self.broker.ca().keys();
        Ok(Response::new(ListSigningKeysResponse {
            keys: keys.iter().map(key_info).collect(),
            sequence: set.sequence,
            refresh_hint_seconds: set.refresh_hint,
            root_online: self.broker.ca().root_online(),
            problems: set.problems.clone(),
        }))
    }

    async fn rotate_signing_key(
        &self,
        request: Request<RotateSigningKeyRequest>,
    ) -> Result<Response<SigningKeyInfo>, Status> {
        let admin = self.auth.check(&request, "RotateSigningKey")?;
        let req = request.into_inner();
        let Some(kind) = crate::store::KeyKind::parse(&req.kind) else {
            return Err(Status::invalid_argument(
                "invalid kind: must be \"x509-intermediate\", \"jwt\" or \"x509-root\"",
            ));
        };
        let result = self.broker.rotate_key(kind, req.immediately).await;
        match &result {
            Ok(k) => {
                tracing::info!(target: "ephemera::audit", action = "RotateSigningKey", admin = %admin, decision = "allow", key_kind = kind.as_str(), key_id = %k.id, activate_at = k.activate_at, immediately = req.immediately, "admin action")
            }
            Err(e) => {
                tracing::info!(target: "ephemera::audit", action = "RotateSigningKey", admin = %admin, decision = "deny", key_kind = kind.as_str(), reason = %e, "admin action")
            }
        }
        let key = result.map_err(|e| key_status(&e))?;
        Ok(Response::new(key_info(&crate::broker::keys::KeyStatus {
            key,
            live_credentials: 0,
            serial: None,
        })))
    }

    async fn revoke_signing_key(
        &self,
        request: Request<RevokeSigningKeyRequest>,
    ) -> Result<Response<RevokeSigningKeyResponse>, Status> {
        let admin = self.auth.check(&request, "RevokeSigningKey")?;
        let req = request.into_inner();
        if req.id.is_empty() || req.id.len() > 64 {
            return Err(Status::invalid_argument(
                "invalid id: must be a key id from `ephemera ca status`",
            ));
        }
        let reason = req.reason.trim();
        if reason.is_empty() || reason.len() > 256 || reason.chars().any(char::is_control) {
            return Err(Status::invalid_argument(
                "invalid reason: required, at most 256 bytes, no control characters",
            ));
        }
        let result = self.broker.revoke_signing_key(&req.id, reason).await;
        match &result {
            Ok(r) => {
                tracing::info!(target: "ephemera::audit", action = "RevokeSigningKey", admin = %admin, decision = "allow", key_id = %r.key.id, key_kind = r.key.kind.as_str(), credentials = r.revoked.as_ref().map_or(0, |v| v.leases), reason = %reason, "admin action")
            }
            Err(e) => {
                tracing::info!(target: "ephemera::audit", action = "RevokeSigningKey", admin = %admin, decision = "deny", key_id = ?shown(&req.id), reason = %e, "admin action")
            }
        }
        let r = result.map_err(|e| key_status(&e))?;
        Ok(Response::new(RevokeSigningKeyResponse {
            key: Some(key_info(&crate::broker::keys::KeyStatus {
                key: r.key,
                live_credentials: 0,
                serial: None,
            })),
            credentials_revoked: r.revoked.as_ref().map_or(0, |v| v.leases),
            cursor: r
                .revoked
                .as_ref()
                .map_or(0, |v| u64::try_from(v.event.seq).unwrap_or(0)),
        }))
    }

    async fn get_intermediate_csr(
        &self,
        request: Request<GetIntermediateCsrRequest>,
    ) -> Result<Response<GetIntermediateCsrResponse>, Status> {
        let admin = self.auth.check(&request, "GetIntermediateCsr")?;
        let (id, csr_pem) = self
            .broker
            .intermediate_csr()
            .await
            .map_err(|e| key_status(&e))?;
        tracing::info!(target: "ephemera::audit", action = "GetIntermediateCsr", admin = %admin, decision = "allow", key_id = %id, "admin action");
        Ok(Response::new(GetIntermediateCsrResponse { id, csr_pem }))
    }

    async fn stage_intermediate(
        &self,
        request: Request<StageIntermediateRequest>,
    ) -> Result<Response<SigningKeyInfo>, Status> {
        let admin = self.auth.check(&request, "StageIntermediate")?;
        let req = request.into_inner();
        let der = pem::parse(req.certificate_pem.as_bytes())
            .ok()
            .filter(|p| p.tag() == "CERTIFICATE")
            .ok_or_else(|| {
                Status::invalid_argument("invalid certificate_pem: expected one PEM CERTIFICATE")
            })?
            .into_contents();
        let result = self.broker.stage_intermediate(&der).await;
        match &result {
            Ok(k) => {
                tracing::info!(target: "ephemera::audit", action = "StageIntermediate", admin = %admin, decision = "allow", key_id = %k.id, activate_at = k.activate_at, "admin action")
            }
            Err(e) => {
                tracing::info!(target: "ephemera::audit", action = "StageIntermediate", admin = %admin, decision = "deny", reason = %e, "admin action")
            }
        }
        let key = result.map_err(|e| key_status(&e))?;
        Ok(Response::new(key_info(&crate::broker::keys::KeyStatus {
            key,
            live_credentials: 0,
            serial: None,
        })))
    }

    async fn create_join_token(
        &self,
        request: Request<CreateJoinTokenRequest>,
    ) -> Result<Response<CreateJoinTokenResponse>, Status> {
        let admin = self.auth.check(&request, "CreateJoinToken")?;
        let req = request.into_inner();
        let result = async {
            if !valid_word(&req.name) {
                return Err(bad(
                    "name",
                    "must be 1 to 255 letters, digits, '.', '-' or '_'",
                ));
            }
            let secs = req.ttl_seconds.unwrap_or(DEFAULT_JOIN_TOKEN_TTL);
            if secs == 0 || secs > MAX_JOIN_TOKEN_TTL {
                return Err(bad(
                    "ttl_seconds",
                    format!("must be between 1 and {MAX_JOIN_TOKEN_TTL}"),
                ));
            }
            if req.claims.len() > MAX_JOIN_TOKEN_CLAIMS {
                return Err(bad(
                    "claims",
                    format!("at most {MAX_JOIN_TOKEN_CLAIMS} claims"),
                ));
            }
            let mut claims = serde_json::Map::new();
            for (k, v) in req.claims {
                if !valid_word(&k) || k.len() > 64 || k == "name" || k == "token_id" {
                    return Err(bad("claims", format!("invalid claim name {k:?}")));
                }
                if v.len() > 255 || v.chars().any(char::is_control) {
                    return Err(bad("claims", format!("claim {k} value is invalid")));
                }
                claims.insert(k, serde_json::Value::from(v));
            }
            let ttl = Ttl::from_secs(secs).map_err(|e| bad("ttl_seconds", e.to_string()))?;
            self.broker
                .create_join_token(&admin, &req.name, ttl, claims)
                .await
        }
        .await;
        let (token, id, expires_at) = result.map_err(|e| to_status(&e))?;
        Ok(Response::new(CreateJoinTokenResponse {
            token: token.into_inner(),
            id,
            expires_at,
        }))
    }
}

/// A key-lifecycle error as a gRPC status (internal causes are logged, not shown).
fn key_status(e: &crate::lease::keys::KeyError) -> Status {
    use crate::lease::keys::KeyError as K;
    match e {
        K::NotFound(_) => Status::not_found(e.to_string()),
        K::Invalid(_) => Status::invalid_argument(e.to_string()),
        K::Precondition(_) => Status::failed_precondition(e.to_string()),
        K::Busy => Status::aborted(e.to_string()),
        K::Store(_) => Status::unavailable(e.to_string()),
        K::Ca(c) => {
            tracing::error!(error = %c, "signing-key operation failed");
            Status::internal("the signing-key operation failed; see the broker's log")
        }
    }
}

fn key_info(k: &crate::broker::keys::KeyStatus) -> SigningKeyInfo {
    use crate::store::KeyState;
    let key = &k.key;
    SigningKeyInfo {
        id: key.id.clone(),
        kind: key.kind.as_str().to_owned(),
        state: key.state.as_str().to_owned(),
        serial: k.serial.clone().unwrap_or_default(),
        not_before: key.not_before,
        not_after: key.not_after,
        activate_at: key.activate_at,
        hand_over_at: if key.state == KeyState::Active && key.kind != crate::store::KeyKind::Root {
            crate::lease::keys::milestones(key).1
        } else {
            0
        },
        live_credentials: k.live_credentials,
        note: key.note.clone().unwrap_or_default(),
        changed_at: key.changed_at,
    }
}

fn lock_info(l: &crate::store::StoredLock, now: i64) -> LockInfo {
    LockInfo {
        id: l.id.clone(),
        target: l.target.clone(),
        reason: l.reason.clone(),
        created_by: l.created_by.clone(),
        created_at: l.created_at,
        expires_at: l.expires_at.unwrap_or(0),
        active: l.expires_at.is_none_or(|e| e > now),
    }
}
