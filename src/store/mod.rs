//! Durable state behind one narrow trait: exactly the queries the broker needs.
//!
//! Backends: SQLite (embedded default) and PostgreSQL (several brokers on one database). Every
//! backend passes the same conformance suite
//! (`store::conformance`). Secrets are never stored in clear: join tokens are kept as SHA-256
//! hashes.

#[cfg(test)]
pub mod conformance;
pub mod postgres;
mod rows;
pub mod sqlite;
mod writer;

pub(crate) use rows::leases_from_json;
pub(crate) use writer::{QueuedLease, lease_writer};

use std::future::Future;
use std::pin::Pin;

/// A boxed future, so stores can be trait objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why the store could not answer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database is unreachable, read-only, full or otherwise failing.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A row that must be unique already exists.
    #[error("already exists")]
    Conflict,
    /// Stored data could not be decoded.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// A lease was refused because its task is no longer active (it ended while the credential
    /// was being minted). Nothing was written.
    #[error("task {0} is no longer active")]
    TaskNotActive(String),
}

impl StoreError {
    /// The same error, for another waiter on one group commit.
    pub(crate) fn duplicate(&self) -> Self {
        match self {
            Self::Unavailable(m) => Self::Unavailable(m.clone()),
            Self::Conflict => Self::Conflict,
            Self::Corrupt(m) => Self::Corrupt(m.clone()),
            Self::TaskNotActive(t) => Self::TaskNotActive(t.clone()),
        }
    }
}

/// SHA-256 of a join token: what is stored and looked up.
pub type TokenHash = [u8; 32];

/// A join token to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewJoinToken {
    /// Hash of the token.
    pub hash: TokenHash,
    /// Public id (for listing and audit).
    pub id: String,
    /// Name, a claim for identity mapping.
    pub name: String,
    /// Extra claims (JSON object).
    pub claims: serde_json::Map<String, serde_json::Value>,
    /// Creation time, Unix seconds.
    pub created_at: i64,
    /// Expiry, Unix seconds.
    pub expires_at: i64,
}

/// A stored join token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// Public id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Extra claims.
    pub claims: serde_json::Map<String, serde_json::Value>,
    /// Creation time, Unix seconds.
    pub created_at: i64,
    /// Expiry, Unix seconds.
    pub expires_at: i64,
    /// When it was used, if it was.
    pub used_at: Option<i64>,
}

/// A task's state. Only `Active` tasks' leases are honoured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskState {
    /// Running.
    Active,
    /// Ended by its owner (`EndTask`).
    Ended,
    /// Ended by the broker: deadline passed or keep-alive lost.
    Expired,
    /// Revoked by an admin or by policy.
    Revoked,
}

impl TaskState {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Ended => "ended",
            Self::Expired => "expired",
            Self::Revoked => "revoked",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Active, Self::Ended, Self::Expired, Self::Revoked]
            .into_iter()
            .find(|t| t.as_str() == s)
    }
}

/// A task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    /// Time-ordered id (UUIDv7).
    pub id: String,
    /// The owner.
    pub spiffe_id: String,
    /// The attestor that proved the owner.
    pub attestor: String,
    /// The owner's attested claims at begin time (for re-evaluation after a policy reload).
    pub claims: serde_json::Map<String, serde_json::Value>,
    /// The owner's [`StoredPrincipal`] (absent on tasks begun before principals were kept).
    pub principal: Option<String>,
    /// Labels.
    pub labels: std::collections::BTreeMap<String, String>,
    /// The declared intent: scopes no credential of the task may exceed (sorted, unique).
    pub scopes: Vec<String>,
    /// The owner's address at begin time (absent on the Unix socket), for re-evaluation.
    pub source_ip: Option<String>,
    /// The age of the owner's evidence at begin time, for re-evaluation.
    pub evidence_age_secs: i64,
    /// Begin time, Unix seconds.
    pub created_at: i64,
    /// Latest end, Unix seconds.
    pub deadline: i64,
    /// Keep-alive interval, seconds.
    pub heartbeat_secs: i64,
    /// Grace after a missed keep-alive, seconds.
    pub grace_secs: i64,
    /// When the task is due to end unless kept alive: min(deadline, last ping + heartbeat +
    /// grace). Updated coarsely by keep-alives.
    pub due_at: i64,
    /// State.
    pub state: TaskState,
    /// When it stopped being active.
    pub ended_at: Option<i64>,
    /// Why it stopped.
    pub reason: Option<String>,
}

/// What a lease records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseKind {
    /// An X.509-SVID (identified by serial).
    X509,
    /// A JWT-SVID (identified by jti = lease id).
    Jwt,
}

impl LeaseKind {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::X509 => "x509",
            Self::Jwt => "jwt",
        }
    }

    /// The kind a stored name names.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "x509" => Some(Self::X509),
            "jwt" => Some(Self::Jwt),
            _ => None,
        }
    }
}

/// One issued credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Time-ordered id (UUIDv7); the `jti` of a JWT-SVID.
    pub id: String,
    /// The task, or `None` for a standalone credential.
    pub task_id: Option<String>,
    /// Kind.
    pub kind: LeaseKind,
    /// X.509 serial (lowercase hex).
    pub serial: Option<String>,
    /// The identity in the credential.
    pub spiffe_id: String,
    /// The [`StoredPrincipal`] it was issued to (absent on leases written before principals
    /// were kept; those are not decided again).
    pub principal: Option<String>,
    /// JWT audiences.
    pub audience: Vec<String>,
    /// Issue time, Unix seconds.
    pub issued_at: i64,
    /// Expiry, Unix seconds.
    pub expires_at: i64,
    /// Whether the lease itself was revoked (its task may also have ended).
    pub revoked: bool,
    /// When and why it was revoked.
    pub revoked_at: Option<i64>,
    /// Why.
    pub reason: Option<String>,
    /// The signing key that signed it (see [`StoredKey::id`]); absent on leases written before
    /// keys were recorded.
    pub signing_key: Option<String>,
}

/// A lease and whether it is honoured right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseStatus {
    /// The lease.
    pub lease: Lease,
    /// The state of its task, if it has one.
    pub task_state: Option<TaskState>,
}

impl LeaseStatus {
    /// Honoured: unexpired, not revoked, and its task (if any) active.
    pub fn active(&self, now: i64) -> bool {
        !self.lease.revoked
            && self.lease.expires_at > now
            && self.task_state.is_none_or(|s| s == TaskState::Active)
    }
}

/// One revocation, as recorded and streamed to watchers; `seq` is the resumable cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// Cursor: strictly increasing.
    pub seq: i64,
    /// When.
    pub at: i64,
    /// The task ended, if a whole task was.
    pub task_id: Option<String>,
    /// The lease revoked, if a single lease was.
    pub lease_id: Option<String>,
    /// The identity, when everything it held was revoked at once (its tasks and every one of
    /// its unexpired credentials).
    pub spiffe_id: Option<String>,
    /// Why.
    pub reason: String,
}

impl Revocation {
    /// Whether this event revoked a set chosen by a decision (a policy or mapping reload, a
    /// lock) rather than one task, lease or identity: the tasks and leases it revoked name it
    /// (`revoked_by`), and [`Store::revoked_leases`] lists them.
    pub fn is_set(&self) -> bool {
        self.task_id.is_none() && self.lease_id.is_none() && self.spiffe_id.is_none()
    }

    /// Whether this event ends `task` (the task itself, or its owner's identity). A set event
    /// ([`Self::is_set`]) may end it too: ask the store.
    pub fn ends_task(&self, task: &Task) -> bool {
        self.task_id.as_deref() == Some(task.id.as_str())
            || self.spiffe_id.as_deref() == Some(task.spiffe_id.as_str())
    }
}

/// What one revocation of many things (an identity, a set) revoked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// The one event listing it all.
    pub event: Revocation,
    /// The active tasks it ended.
    pub task_ids: Vec<String>,
    /// Unexpired credentials revoked (in those tasks or standalone).
    pub leases: u64,
}

/// What a decision needs of an attested caller, kept once per distinct caller and referenced by
/// its tasks and leases, so live credentials can be decided again (after a policy or mapping
/// reload, or a lock) without fresh evidence. It holds no evidence and no secret: the
/// attestor's name, the subject and claims it yielded, and the caller's address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPrincipal {
    /// SHA-256 of everything below (base64url): equal callers share one row.
    pub id: String,
    /// The attestor that verified the caller.
    pub attestor: String,
    /// The attestor's subject (`uid:1000`, `issuer#sub`).
    pub subject: String,
    /// The attested claims.
    pub claims: serde_json::Map<String, serde_json::Value>,
    /// The caller's address (absent on the Unix socket).
    pub source_ip: Option<String>,
}

impl StoredPrincipal {
    /// The principal of a caller, with its id computed.
    pub fn new(
        attestor: &str,
        subject: &str,
        claims: &serde_json::Map<String, serde_json::Value>,
        source_ip: Option<String>,
    ) -> Self {
        use base64::Engine as _;
        // Claims are a sorted map, so equal claims serialize equally.
        let canonical = serde_json::json!([attestor, subject, claims, source_ip]).to_string();
        let digest = ring::digest::digest(&ring::digest::SHA256, canonical.as_bytes());
        Self {
            id: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(digest.as_ref()),
            attestor: attestor.to_owned(),
            subject: subject.to_owned(),
            claims: claims.clone(),
            source_ip,
        }
    }
}

/// Live credentials that share everything a decision reads: one principal, identity, kind,
/// audience and task. Re-evaluation decides each once, however many leases it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The [`StoredPrincipal`].
    pub principal: String,
    /// The identity in the credentials.
    pub spiffe_id: String,
    /// Their kind.
    pub kind: LeaseKind,
    /// Their audiences (JWT).
    pub audience: Vec<String>,
    /// Their task, or `None` for standalone credentials.
    pub task_id: Option<String>,
    /// How many live leases.
    pub leases: u64,
    /// The latest expiry among them, Unix seconds.
    pub expires_at: i64,
}

/// What one set revocation revokes: active tasks to end and live leases of grants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RevokeSet {
    /// Tasks to end (`revoked`), with every credential in them.
    pub tasks: Vec<String>,
    /// Grants whose live leases are revoked (their `leases` and `expires_at` are not read).
    pub grants: Vec<Grant>,
    /// Signing keys every live lease of which is revoked (a revoked key).
    pub signing_keys: Vec<String>,
    /// Record the event even when nothing was live (a lock's creation: every replica learns
    /// of the lock from it).
    pub announce: bool,
}

impl RevokeSet {
    /// Whether there is nothing to revoke.
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
            && self.grants.is_empty()
            && self.signing_keys.is_empty()
            && !self.announce
    }
}

/// What a signing key is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyKind {
    /// A root CA certificate: a trust anchor (its key is never held in the store).
    Root,
    /// An X.509 intermediate CA: signs X.509-SVIDs and CRLs.
    X509,
    /// An ES256 key: signs JWT-SVIDs.
    Jwt,
}

impl KeyKind {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Root => "x509-root",
            Self::X509 => "x509-intermediate",
            Self::Jwt => "jwt",
        }
    }

    /// The kind a stored name names.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Root, Self::X509, Self::Jwt]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

/// Where a signing key is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyState {
    /// An intermediate key whose certificate the offline root has yet to sign: its CSR is
    /// waiting for an operator. Not published.
    Pending,
    /// Published, not yet signing.
    Prepared,
    /// Signing (one per kind).
    Active,
    /// No longer signing; published until the last credential it signed has expired.
    Retired,
    /// Withdrawn after a compromise: not published, everything it signed revoked.
    Revoked,
}

impl KeyState {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Prepared => "prepared",
            Self::Active => "active",
            Self::Retired => "retired",
            Self::Revoked => "revoked",
        }
    }

    /// The state a stored name names.
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Pending,
            Self::Prepared,
            Self::Active,
            Self::Retired,
            Self::Revoked,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }

    /// Whether relying parties are given the key (bundles, JWKS).
    pub fn published(self) -> bool {
        matches!(self, Self::Prepared | Self::Active | Self::Retired)
    }
}

/// A signing key or trust anchor as the store keeps it: public parts in the clear, the private
/// key only wrapped (AES-256-GCM under the data directory's key-encryption key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredKey {
    /// The RFC 7638 thumbprint of its public key (a JWT key's `kid`).
    pub id: String,
    /// What it is.
    pub kind: KeyKind,
    /// Where it is in its life.
    pub state: KeyState,
    /// The certificate (DER) of a root or intermediate, the CSR (DER) of a pending
    /// intermediate, or the public key (SEC1 uncompressed point) of a JWT key.
    pub public: Vec<u8>,
    /// The wrapped PKCS#8 private key (`None` for a root).
    pub wrapped: Option<Vec<u8>>,
    /// Start of validity, Unix seconds.
    pub not_before: i64,
    /// End of validity, Unix seconds: nothing it signs outlives it.
    pub not_after: i64,
    /// When it becomes (or became) the active key, Unix seconds.
    pub activate_at: i64,
    /// When it was created, Unix seconds.
    pub created_at: i64,
    /// When its state last changed, Unix seconds.
    pub changed_at: i64,
    /// Why it was revoked, or how it was made (`imported`, `scheduled`, `forced`, `staged`).
    pub note: Option<String>,
}

/// One change to the signing keys, applied with others in one transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyOp {
    /// Inserts the key or replaces the stored one with the same id.
    Put(StoredKey),
    /// Forgets a key (expired and no longer published).
    Delete(String),
}

/// A lock: while it matches a caller, nothing is issued to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredLock {
    /// Time-ordered id (UUIDv7).
    pub id: String,
    /// What it matches, in its text form (`spiffe_id=...`, `claim:repository=...`).
    pub target: String,
    /// Why (shown to refused callers as "locked: <reason>").
    pub reason: String,
    /// Who created it.
    pub created_by: String,
    /// Creation time, Unix seconds.
    pub created_at: i64,
    /// When it stops matching, Unix seconds; `None` for never.
    pub expires_at: Option<i64>,
}

/// A revoked, unexpired X.509 serial (for the CRL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedSerial {
    /// Lowercase hex serial.
    pub serial: String,
    /// When it stopped being honoured.
    pub revoked_at: i64,
    /// The certificate's notAfter.
    pub expires_at: i64,
}

/// Filters and paging for listings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListFilter {
    /// Only this task's leases.
    pub task_id: Option<String>,
    /// Only this SPIFFE ID.
    pub spiffe_id: Option<String>,
    /// Only rows in this state, as listings show it: for tasks `active`, `ended`, `expired`,
    /// `revoked`; for leases `active`, `revoked`, `expired`, `task_ended`, `task_expired`,
    /// `task_revoked`; for both `inactive` (any but `active`).
    pub state: Option<String>,
    /// Return rows older than this (the previous page's last id): listings are newest first.
    pub after: Option<String>,
    /// At most this many rows.
    pub limit: u32,
}

/// The condition of a lease listing on its task filter, whose value is bound as `param`.
///
/// With a task, the condition is a plain equality, so the database finds the task's leases
/// through its index and sorts that many (a task holds a bounded number). The always-true form,
/// `param IS NULL OR task_id = param`, hides the index from a plan made before the value is
/// known, and a listing of one task's leases then read the whole table in id order.
fn task_condition(f: &ListFilter, param: &str) -> String {
    match f.task_id {
        Some(_) => format!("l.task_id = {param}"),
        None => format!("{param} IS NULL"),
    }
}

/// The state a listing shows for a lease (`l`) of a task (`t`, left-joined), as SQL: `now` is
/// the placeholder of the current time and `revoked` the backend's test of the revoked flag.
fn lease_state_sql(now: &str, revoked: &str) -> String {
    format!(
        "CASE WHEN {revoked} THEN 'revoked' WHEN l.expires_at <= {now} THEN 'expired' \
         WHEN t.id IS NOT NULL AND t.state <> 'active' THEN 'task_' || t.state \
         ELSE 'active' END"
    )
}

/// The condition of a listing on its state filter `param`, for a row whose state is `state`.
fn state_condition(state: &str, param: &str) -> String {
    format!(
        "({param} IS NULL OR {state} = {param} OR ({param} = 'inactive' AND {state} <> 'active'))"
    )
}

/// Which leases a revocation event covers, for [`Store::revoked_leases`]: each kind of event
/// has its own condition, so the database reads them through the index that kind needs (one
/// statement with every kind's condition joined by OR was planned as a scan of every lease).
pub(crate) enum EventLeases<'a> {
    /// Every lease of a task.
    Task(&'a str),
    /// One lease.
    Lease(&'a str),
    /// What an identity revocation revoked: the identity's leases revoked at that moment for
    /// that reason.
    Identity {
        /// The identity.
        spiffe_id: &'a str,
        /// When.
        at: i64,
        /// Why.
        reason: &'a str,
    },
    /// Leases and task leases that name the event in `revoked_by`.
    Set(i64),
}

impl<'a> EventLeases<'a> {
    /// The leases `event` covers.
    pub(crate) fn of(event: &'a Revocation) -> Self {
        if let Some(t) = &event.task_id {
            Self::Task(t)
        } else if let Some(l) = &event.lease_id {
            Self::Lease(l)
        } else if let Some(id) = &event.spiffe_id {
            Self::Identity {
                spiffe_id: id,
                at: event.at,
                reason: &event.reason,
            }
        } else {
            Self::Set(event.seq)
        }
    }

    /// The condition on `leases`, with placeholders numbered by `p(1)`, `p(2)`, ...; bind
    /// [`Self::bind`]'s values in order.
    pub(crate) fn condition(&self, p: impl Fn(usize) -> String) -> String {
        match self {
            Self::Task(_) => format!("task_id = {}", p(1)),
            Self::Lease(_) => format!("id = {}", p(1)),
            Self::Identity { .. } => format!(
                "spiffe_id = {} AND revoked_at = {} AND reason = {} AND revoked_by IS NULL",
                p(1),
                p(2),
                p(3)
            ),
            Self::Set(_) => format!(
                "revoked_by = {0} OR task_id IN (SELECT id FROM tasks WHERE revoked_by = {0})",
                p(1)
            ),
        }
    }
}

/// What [`Store::prune`] deletes, in order, each statement bound to the cutoff time (written
/// `{before}`, replaced by each backend's placeholder): leases expired before it, tasks ended
/// before it that no lease names, revocation events older than it, and locks expired before
/// it. Each backend then deletes the principals last seen before it that nothing names, in the
/// form its planner runs in one pass (SQLite: `NOT IN`, which it reads into a temporary index;
/// PostgreSQL: `NOT EXISTS`, an anti-join).
pub(crate) const PRUNE: &[&str] = &[
    "DELETE FROM leases WHERE expires_at < {before}",
    "DELETE FROM tasks WHERE state <> 'active' AND ended_at < {before}
       AND NOT EXISTS (SELECT 1 FROM leases WHERE leases.task_id = tasks.id)",
    "DELETE FROM revocations WHERE at < {before}",
    "DELETE FROM locks WHERE expires_at < {before}",
];

/// Why the reaper ends a task at `now`.
pub fn reap_reason(deadline: i64, now: i64) -> &'static str {
    if deadline <= now {
        "deadline passed"
    } else {
        "keep-alive lost"
    }
}

/// The broker's durable state.
pub trait Store: Send + Sync {
    /// Records a new task.
    fn insert_task(&self, task: Task) -> BoxFuture<'_, Result<(), StoreError>>;

    /// A task by id.
    fn task(&self, id: &str) -> BoxFuture<'_, Result<Option<Task>, StoreError>>;

    /// Pushes an active task's `due_at` forward (a keep-alive); `false` if it is not active.
    fn keep_alive(&self, id: &str, due_at: i64) -> BoxFuture<'_, Result<bool, StoreError>>;

    /// Ends an active task with `state` and records one revocation event; one write whatever
    /// the task's lease count. `None` if the task was not active.
    fn end_task(
        &self,
        id: &str,
        state: TaskState,
        reason: &str,
        now: i64,
    ) -> BoxFuture<'_, Result<Option<Revocation>, StoreError>>;

    /// Active tasks whose `due_at` is at or before `now` (at most `limit`).
    fn due_tasks(&self, now: i64, limit: u32) -> BoxFuture<'_, Result<Vec<Task>, StoreError>>;

    /// Ends every due task (deadline passed, keep-alive lost), at most `limit`, each exactly once
    /// even when several brokers reap at the same time. Returns the tasks ended and their events.
    fn end_due_tasks(
        &self,
        now: i64,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<(Task, Revocation)>, StoreError>> {
        Box::pin(async move {
            let mut ended = Vec::new();
            for task in self.due_tasks(now, limit).await? {
                let reason = reap_reason(task.deadline, now);
                if let Some(event) = self
                    .end_task(&task.id, TaskState::Expired, reason, now)
                    .await?
                {
                    ended.push((task, event));
                }
            }
            Ok(ended)
        })
    }

    /// After a restart: gives every active task one fresh grace period to reconnect.
    fn refresh_active_tasks(&self, now: i64) -> BoxFuture<'_, Result<u64, StoreError>>;

    /// Records a lease durably (group-committed); returns once committed. A lease of a task
    /// is written only while the task is active, checked atomically with the write (an
    /// `EndTask` that commits first makes this return [`StoreError::TaskNotActive`]), so every
    /// lease of an ended task is covered by its revocation event.
    fn insert_lease(&self, lease: Lease) -> BoxFuture<'_, Result<(), StoreError>>;

    /// A lease by id, or by X.509 serial.
    fn lease(&self, id_or_serial: &str) -> BoxFuture<'_, Result<Option<LeaseStatus>, StoreError>>;

    /// Revokes one lease and records a revocation event; `None` if already revoked or unknown.
    fn revoke_lease(
        &self,
        id: &str,
        reason: &str,
        now: i64,
    ) -> BoxFuture<'_, Result<Option<Revocation>, StoreError>>;

    /// Revocation events after `cursor`, oldest first.
    fn revocations_after(
        &self,
        cursor: i64,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<Revocation>, StoreError>>;

    /// The newest revocation event's number; 0 when there is none.
    fn newest_revocation(&self) -> BoxFuture<'_, Result<i64, StoreError>>;

    /// Revokes everything `spiffe_id` holds, in one transaction and one event: every active
    /// task ends (`revoked`) and every unexpired credential is revoked, in a task or not.
    /// `None` when it held nothing.
    fn revoke_identity(
        &self,
        spiffe_id: &str,
        reason: &str,
        now: i64,
    ) -> BoxFuture<'_, Result<Option<Revoked>, StoreError>>;

    /// Records a principal (or, if it is known, when it was last seen), so tasks and leases can
    /// name it.
    fn remember_principal(
        &self,
        principal: &StoredPrincipal,
        now: i64,
    ) -> BoxFuture<'_, Result<(), StoreError>>;

    /// The principals with these ids (unknown ids are left out).
    fn principals(
        &self,
        ids: Vec<String>,
    ) -> BoxFuture<'_, Result<Vec<StoredPrincipal>, StoreError>>;

    /// Live credentials that name a principal, grouped into [`Grant`]s: the standalone ones
    /// (`tasks` is `None`), or those of these tasks (if active).
    fn live_grants(
        &self,
        now: i64,
        tasks: Option<Vec<String>>,
    ) -> BoxFuture<'_, Result<Vec<Grant>, StoreError>>;

    /// Ends the set's active tasks and revokes its grants' live leases, in one transaction
    /// and one event ([`Revocation::is_set`]). `None` when nothing was live (unless the set
    /// is announced).
    fn revoke_set(
        &self,
        set: RevokeSet,
        reason: &str,
        now: i64,
    ) -> BoxFuture<'_, Result<Option<Revoked>, StoreError>>;

    /// The signing keys and the sequence number of their last change.
    fn signing_keys(&self) -> BoxFuture<'_, Result<(u64, Vec<StoredKey>), StoreError>>;

    /// Applies `ops` in one transaction if the keys are still at sequence `expected`, and
    /// returns the new sequence; `None` (nothing written) if another change came first.
    fn change_keys(
        &self,
        expected: u64,
        ops: Vec<KeyOp>,
    ) -> BoxFuture<'_, Result<Option<u64>, StoreError>>;

    /// How many honoured credentials each signing key signed, at `now`.
    fn live_by_signing_key(
        &self,
        now: i64,
    ) -> BoxFuture<'_, Result<Vec<(String, u64)>, StoreError>>;

    /// Stores a lock.
    fn create_lock(&self, lock: StoredLock) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Every lock, expired ones included, newest first.
    fn locks(&self) -> BoxFuture<'_, Result<Vec<StoredLock>, StoreError>>;

    /// Deletes a lock; `false` if there was none.
    fn delete_lock(&self, id: &str) -> BoxFuture<'_, Result<bool, StoreError>>;

    /// Leases affected by a revocation event (the lease, every lease of the task, every
    /// credential an identity revocation revoked, or every lease and task lease of a set).
    fn revoked_leases(&self, event: &Revocation) -> BoxFuture<'_, Result<Vec<Lease>, StoreError>>;

    /// Serials of X.509 leases no longer honoured but not yet expired at `now`.
    fn revoked_serials(&self, now: i64) -> BoxFuture<'_, Result<Vec<RevokedSerial>, StoreError>>;

    /// Tasks, newest first, filtered and paged.
    fn list_tasks(
        &self,
        filter: ListFilter,
        now: i64,
    ) -> BoxFuture<'_, Result<Vec<Task>, StoreError>>;

    /// Leases, newest first, filtered and paged.
    fn list_leases(
        &self,
        filter: ListFilter,
        now: i64,
    ) -> BoxFuture<'_, Result<Vec<LeaseStatus>, StoreError>>;

    /// Active tasks (for re-evaluation after a policy reload), paged by id.
    fn active_tasks(
        &self,
        after: Option<String>,
        limit: u32,
    ) -> BoxFuture<'_, Result<Vec<Task>, StoreError>>;

    /// Deletes leases and tasks that stopped mattering before `before` (expired or ended),
    /// revocation events older than that, principals last seen before it that nothing names,
    /// and locks expired before it. Returns rows deleted.
    fn prune(&self, before: i64) -> BoxFuture<'_, Result<u64, StoreError>>;

    /// Stores a new join token.
    fn create_join_token(&self, token: NewJoinToken) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Looks up a join token by hash.
    fn join_token(&self, hash: TokenHash) -> BoxFuture<'_, Result<Option<JoinToken>, StoreError>>;

    /// Marks a join token used, if it is unused and unexpired at `now`. Returns whether this
    /// call consumed it: of concurrent callers, exactly one wins.
    fn consume_join_token(
        &self,
        hash: TokenHash,
        now: i64,
    ) -> BoxFuture<'_, Result<bool, StoreError>>;

    /// How many tasks are active and how many leases are honoured at `now` (for metrics).
    fn counts(&self, now: i64) -> BoxFuture<'_, Result<(u64, u64), StoreError>>;

    /// How many active tasks `spiffe_id` owns (for its quota).
    fn count_active_tasks(&self, spiffe_id: &str) -> BoxFuture<'_, Result<u64, StoreError>>;

    /// How many leases were recorded in a task (for its quota).
    fn count_task_leases(&self, task_id: &str) -> BoxFuture<'_, Result<u64, StoreError>>;

    /// Whether the store accepts writes now (for `/readyz`): a small real write.
    fn ping(&self) -> BoxFuture<'_, Result<(), StoreError>>;
}
