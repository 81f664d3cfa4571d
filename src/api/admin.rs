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

use super::pb::v1::{CreateJoinTokenRequest, CreateJoinTokenResponse, admin_server};
use super::status::to_status;
use crate::broker::{Broker, BrokerError};
use crate::ca::CaError;
use crate::id::Ttl;

/// Admin token file name in the data directory.
pub const TOKEN_FILE: &str = "admin.token";
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

/// Who may call the Admin API.
pub struct AdminAuth {
    token_hash: Option<[u8; 32]>,
    token_file: PathBuf,
}

fn sha256(b: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, b).as_ref());
    out
}

impl AdminAuth {
    /// Loads the admin token file; a missing file disables the Admin API, a file readable by
    /// group or others refuses to start.
    pub fn load(token_file: &Path) -> Result<Self, CaError> {
        if !token_file.exists() {
            tracing::warn!(file = %token_file.display(), "no admin token file: the Admin API is disabled");
            return Ok(Self {
                token_hash: None,
                token_file: token_file.to_owned(),
            });
        }
        crate::ca::keys::check_key_mode(token_file)?;
        let text = std::fs::read_to_string(token_file).map_err(|source| CaError::Io {
            path: token_file.to_owned(),
            source,
        })?;
        let token = text.trim();
        if token.len() < 32 {
            return Err(CaError::Invalid {
                path: token_file.to_owned(),
                reason: "admin token is shorter than 32 characters".into(),
            });
        }
        Ok(Self {
            token_hash: Some(sha256(token.as_bytes())),
            token_file: token_file.to_owned(),
        })
    }

    /// The admin identity of a request, or `PermissionDenied`.
    pub fn check<T>(&self, request: &Request<T>, action: &str) -> Result<&'static str, Status> {
        let source = request.remote_addr().map(|a| a.to_string());
        let Some(expected) = self.token_hash else {
            tracing::info!(target: "ephemera::audit", action, decision = "deny", reason = "admin API disabled", source = source.as_deref(), "admin action");
            return Err(Status::permission_denied(format!(
                "the Admin API is disabled: no admin token file at {}",
                self.token_file.display()
            )));
        };
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| sha256(t.trim().as_bytes()));
        // Hashes are compared, so timing reveals nothing about the token.
        if presented == Some(expected) {
            Ok("admin-token")
        } else {
            tracing::info!(target: "ephemera::audit", action, decision = "deny", reason = "no admin credential", source = source.as_deref(), "admin action");
            Err(Status::permission_denied("admin credential required"))
        }
    }
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
                .create_join_token(admin, &req.name, ttl, claims)
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
