//! What both backends share of their rows: the column lists, the decoders from a row to a
//! [`Task`], [`LeaseStatus`] or [`Revocation`], and the values a task is inserted with. Each
//! backend only supplies its placeholders and how it reads a column ([`Columns`]).

use sqlx::{Database, Encode, Row, Type};

use super::{
    Grant, KeyKind, KeyState, Lease, LeaseKind, LeaseStatus, Revocation, StoreError, StoredKey,
    StoredLock, StoredPrincipal, Task, TaskState,
};

/// The columns [`task_row`] reads.
pub(super) const TASK_COLUMNS: &str = "id, spiffe_id, attestor, principal, claims, labels, scopes, source_ip, evidence_age_secs, created_at, deadline, heartbeat_secs, grace_secs, due_at, state, ended_at, reason";

/// The columns [`lease_row`] reads: `l` the lease, `t` its task (left-joined).
pub(super) const LEASE_COLUMNS: &str = "l.id, l.task_id, l.kind, l.serial, l.spiffe_id, l.principal, l.audience, l.issued_at, l.expires_at, l.revoked, l.revoked_at, l.reason, l.signing_key, t.state AS task_state";

/// The columns a new task is inserted with, in [`bind_task`]'s order.
pub(super) const TASK_INSERT_COLUMNS: &str = "id, spiffe_id, attestor, principal, claims, labels, scopes, source_ip, evidence_age_secs, created_at, deadline, heartbeat_secs, grace_secs, due_at, state";

/// How many values [`bind_task`] binds.
pub(super) const TASK_INSERT_VALUES: usize = 15;

/// Reads a column of a backend's row.
pub(super) trait Columns {
    /// A text column.
    fn text(&self, column: &str) -> Result<String, StoreError>;
    /// A nullable text column.
    fn opt_text(&self, column: &str) -> Result<Option<String>, StoreError>;
    /// An integer column.
    fn int(&self, column: &str) -> Result<i64, StoreError>;
    /// A nullable integer column.
    fn opt_int(&self, column: &str) -> Result<Option<i64>, StoreError>;
    /// A boolean column (an integer 0/1 in SQLite).
    fn flag(&self, column: &str) -> Result<bool, StoreError>;
    /// A nullable binary column.
    fn opt_bytes(&self, column: &str) -> Result<Option<Vec<u8>>, StoreError>;
}

fn unavailable(e: sqlx::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

/// Both backends read text and integers alike; they differ in how a boolean is stored.
macro_rules! columns {
    ($row:ty, |$r:ident, $c:ident| $flag:expr) => {
        impl Columns for $row {
            fn text(&self, c: &str) -> Result<String, StoreError> {
                self.try_get(c).map_err(unavailable)
            }
            fn opt_text(&self, c: &str) -> Result<Option<String>, StoreError> {
                self.try_get(c).map_err(unavailable)
            }
            fn int(&self, c: &str) -> Result<i64, StoreError> {
                self.try_get(c).map_err(unavailable)
            }
            fn opt_int(&self, c: &str) -> Result<Option<i64>, StoreError> {
                self.try_get(c).map_err(unavailable)
            }
            fn flag(&self, $c: &str) -> Result<bool, StoreError> {
                let $r = self;
                $flag
            }
            fn opt_bytes(&self, c: &str) -> Result<Option<Vec<u8>>, StoreError> {
                self.try_get(c).map_err(unavailable)
            }
        }
    };
}

columns!(sqlx::sqlite::SqliteRow, |r, c| Ok(r
    .try_get::<i64, _>(c)
    .map_err(unavailable)?
    != 0));
columns!(sqlx::postgres::PgRow, |r, c| r
    .try_get(c)
    .map_err(unavailable));

/// A task from a row of [`TASK_COLUMNS`].
pub(super) fn task_row(row: &impl Columns) -> Result<Task, StoreError> {
    let state = row.text("state")?;
    Ok(Task {
        id: row.text("id")?,
        spiffe_id: row.text("spiffe_id")?,
        attestor: row.text("attestor")?,
        principal: row.opt_text("principal")?,
        claims: serde_json::from_str(&row.text("claims")?).map_err(corrupt)?,
        source_ip: row.opt_text("source_ip")?,
        evidence_age_secs: row.int("evidence_age_secs")?,
        labels: serde_json::from_str(&row.text("labels")?).map_err(corrupt)?,
        scopes: serde_json::from_str(&row.text("scopes")?).map_err(corrupt)?,
        created_at: row.int("created_at")?,
        deadline: row.int("deadline")?,
        heartbeat_secs: row.int("heartbeat_secs")?,
        grace_secs: row.int("grace_secs")?,
        due_at: row.int("due_at")?,
        state: TaskState::parse(&state).ok_or_else(|| corrupt(format!("task state {state}")))?,
        ended_at: row.opt_int("ended_at")?,
        reason: row.opt_text("reason")?,
    })
}

/// A lease with its task's state from a row of [`LEASE_COLUMNS`].
pub(super) fn lease_row(row: &impl Columns) -> Result<LeaseStatus, StoreError> {
    let kind = row.text("kind")?;
    Ok(LeaseStatus {
        lease: Lease {
            id: row.text("id")?,
            task_id: row.opt_text("task_id")?,
            kind: LeaseKind::parse(&kind).ok_or_else(|| corrupt(format!("lease kind {kind}")))?,
            serial: row.opt_text("serial")?,
            spiffe_id: row.text("spiffe_id")?,
            principal: row.opt_text("principal")?,
            audience: serde_json::from_str(&row.text("audience")?).map_err(corrupt)?,
            issued_at: row.int("issued_at")?,
            expires_at: row.int("expires_at")?,
            revoked: row.flag("revoked")?,
            revoked_at: row.opt_int("revoked_at")?,
            reason: row.opt_text("reason")?,
            signing_key: row.opt_text("signing_key")?,
        },
        task_state: row
            .opt_text("task_state")?
            .as_deref()
            .and_then(TaskState::parse),
    })
}

/// The columns [`key_row`] reads, in the order a key is written.
pub(super) const KEY_COLUMNS: &str = "id, kind, state, public, wrapped, not_before, not_after, activate_at, created_at, changed_at, note";

/// A signing key from a row of [`KEY_COLUMNS`].
pub(super) fn key_row(row: &impl Columns) -> Result<StoredKey, StoreError> {
    let kind = row.text("kind")?;
    let state = row.text("state")?;
    Ok(StoredKey {
        id: row.text("id")?,
        kind: KeyKind::parse(&kind).ok_or_else(|| corrupt(format!("key kind {kind}")))?,
        state: KeyState::parse(&state).ok_or_else(|| corrupt(format!("key state {state}")))?,
        public: row.opt_bytes("public")?.unwrap_or_default(),
        wrapped: row.opt_bytes("wrapped")?,
        not_before: row.int("not_before")?,
        not_after: row.int("not_after")?,
        activate_at: row.int("activate_at")?,
        created_at: row.int("created_at")?,
        changed_at: row.int("changed_at")?,
        note: row.opt_text("note")?,
    })
}

/// The columns [`revocation_row`] reads.
pub(super) const REVOCATION_COLUMNS: &str = "seq, at, task_id, lease_id, spiffe_id, reason";

/// A revocation event from a row of [`REVOCATION_COLUMNS`].
pub(super) fn revocation_row(row: &impl Columns) -> Result<Revocation, StoreError> {
    Ok(Revocation {
        seq: row.int("seq")?,
        at: row.int("at")?,
        task_id: row.opt_text("task_id")?,
        lease_id: row.opt_text("lease_id")?,
        spiffe_id: row.opt_text("spiffe_id")?,
        reason: row.text("reason")?,
    })
}

/// Binds a new task's values, in [`TASK_INSERT_COLUMNS`] order.
pub(super) fn bind_task<'q, DB: Database>(
    query: sqlx::query::Query<'q, DB, DB::Arguments>,
    t: &Task,
) -> Result<sqlx::query::Query<'q, DB, DB::Arguments>, StoreError>
where
    for<'t> String: Encode<'t, DB> + Type<DB>,
    for<'t> Option<String>: Encode<'t, DB> + Type<DB>,
    for<'t> i64: Encode<'t, DB> + Type<DB>,
{
    let labels = serde_json::to_string(&t.labels).map_err(corrupt)?;
    let claims = serde_json::Value::Object(t.claims.clone()).to_string();
    Ok(query
        .bind(t.id.clone())
        .bind(t.spiffe_id.clone())
        .bind(t.attestor.clone())
        .bind(t.principal.clone())
        .bind(claims)
        .bind(labels)
        .bind(serde_json::to_string(&t.scopes).map_err(corrupt)?)
        .bind(t.source_ip.clone())
        .bind(t.evidence_age_secs)
        .bind(t.created_at)
        .bind(t.deadline)
        .bind(t.heartbeat_secs)
        .bind(t.grace_secs)
        .bind(t.due_at)
        .bind(t.state.as_str().to_owned()))
}

/// Binds a signing key's values, in [`KEY_COLUMNS`] order.
pub(super) fn bind_key<'q, DB: Database>(
    query: sqlx::query::Query<'q, DB, DB::Arguments>,
    k: StoredKey,
) -> sqlx::query::Query<'q, DB, DB::Arguments>
where
    for<'t> String: Encode<'t, DB> + Type<DB>,
    for<'t> Option<String>: Encode<'t, DB> + Type<DB>,
    for<'t> Vec<u8>: Encode<'t, DB> + Type<DB>,
    for<'t> Option<Vec<u8>>: Encode<'t, DB> + Type<DB>,
    for<'t> i64: Encode<'t, DB> + Type<DB>,
{
    query
        .bind(k.id)
        .bind(k.kind.as_str().to_owned())
        .bind(k.state.as_str().to_owned())
        .bind(k.public)
        .bind(k.wrapped)
        .bind(k.not_before)
        .bind(k.not_after)
        .bind(k.activate_at)
        .bind(k.created_at)
        .bind(k.changed_at)
        .bind(k.note)
}

/// A lease as the stores' revocation expansion reads it: one JSON array of the lease's columns
/// in table order (`revoked` as 0 or 1, `audience` as its JSON array).
type LeaseJson = (
    String,
    Option<String>,
    String,
    Option<String>,
    String,
    Vec<String>,
    i64,
    i64,
    i64,
    Option<i64>,
    Option<String>,
);

/// The leases of a JSON array of [`LeaseJson`] rows, built by the database in one query: a task
/// may hold thousands of leases, and handing each back as a row of values costs several times
/// the read itself (per value copies, per row messages, decoding by column name). The principal
/// is not read (nothing that lists revoked credentials needs it).
pub(crate) fn leases_from_json(json: &str) -> Result<Vec<Lease>, StoreError> {
    let rows: Vec<LeaseJson> = serde_json::from_str(json)
        .map_err(|e| StoreError::Corrupt(format!("revoked leases: {e}")))?;
    rows.into_iter()
        .map(|row| {
            Ok(Lease {
                kind: LeaseKind::parse(&row.2)
                    .ok_or_else(|| StoreError::Corrupt(format!("lease kind {}", row.2)))?,
                id: row.0,
                task_id: row.1,
                serial: row.3,
                spiffe_id: row.4,
                principal: None,
                audience: row.5,
                issued_at: row.6,
                expires_at: row.7,
                revoked: row.8 != 0,
                revoked_at: row.9,
                reason: row.10,
                signing_key: None,
            })
        })
        .collect()
}

/// The columns [`principal_row`] reads.
pub(super) const PRINCIPAL_COLUMNS: &str = "id, attestor, subject, claims, source_ip";

/// A principal from a row of [`PRINCIPAL_COLUMNS`].
pub(super) fn principal_row(row: &impl Columns) -> Result<StoredPrincipal, StoreError> {
    Ok(StoredPrincipal {
        id: row.text("id")?,
        attestor: row.text("attestor")?,
        subject: row.text("subject")?,
        claims: serde_json::from_str(&row.text("claims")?).map_err(corrupt)?,
        source_ip: row.opt_text("source_ip")?,
    })
}

/// The columns [`grant_row`] reads (a `GROUP BY` of live leases).
pub(super) const GRANT_COLUMNS: &str = "l.principal AS principal, l.spiffe_id AS spiffe_id, l.kind AS kind, l.audience AS audience, l.task_id AS task_id, COUNT(*) AS leases, MAX(l.expires_at) AS expires_at";

/// What [`GRANT_COLUMNS`] groups by.
pub(super) const GRANT_GROUP: &str = "l.principal, l.spiffe_id, l.kind, l.audience, l.task_id";

/// A grant from a row of [`GRANT_COLUMNS`].
pub(super) fn grant_row(row: &impl Columns) -> Result<Grant, StoreError> {
    let kind = row.text("kind")?;
    Ok(Grant {
        principal: row.text("principal")?,
        spiffe_id: row.text("spiffe_id")?,
        kind: LeaseKind::parse(&kind).ok_or_else(|| corrupt(format!("lease kind {kind}")))?,
        audience: serde_json::from_str(&row.text("audience")?).map_err(corrupt)?,
        task_id: row.opt_text("task_id")?,
        leases: u64::try_from(row.int("leases")?).unwrap_or(0),
        expires_at: row.int("expires_at")?,
    })
}

/// The columns [`lock_row`] reads.
pub(super) const LOCK_COLUMNS: &str = "id, target, reason, created_by, created_at, expires_at";

/// A lock from a row of [`LOCK_COLUMNS`].
pub(super) fn lock_row(row: &impl Columns) -> Result<StoredLock, StoreError> {
    Ok(StoredLock {
        id: row.text("id")?,
        target: row.text("target")?,
        reason: row.text("reason")?,
        created_by: row.text("created_by")?,
        created_at: row.int("created_at")?,
        expires_at: row.opt_int("expires_at")?,
    })
}

/// A set's grants as one JSON array of `[principal, spiffe_id, kind, audience, task_id]`, the
/// audience in its stored text form, for a statement to match leases against.
pub(super) fn grants_json(grants: &[Grant]) -> String {
    serde_json::Value::Array(
        grants
            .iter()
            .map(|g| {
                serde_json::json!([
                    g.principal,
                    g.spiffe_id,
                    g.kind.as_str(),
                    serde_json::Value::from(g.audience.clone()).to_string(),
                    g.task_id,
                ])
            })
            .collect(),
    )
    .to_string()
}
