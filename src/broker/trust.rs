//! Trust that is never carried forward: every live credential is decided again when what
//! decided it changes. Three things change it:
//! - a policy or mapping reload ([`Broker::redecide`]): every live task and credential is
//!   decided again from its stored principal, and what is no longer permitted is revoked in
//!   one event with reason `policy`;
//! - a lock ([`Broker::create_lock`]): nothing is issued to what it matches, and everything
//!   it matches that is live is revoked in one event;
//! - the principals themselves: a caller's attested principal (attestor, subject, claims,
//!   address; never evidence) is stored once, by a hash of all of it, and named by its tasks
//!   and leases, so a decision can be made again without fresh evidence.
//!
//! Re-decision reads the live leases grouped (one row per distinct principal, identity, kind,
//! audience and task), a page of tasks at a time, and makes one policy decision per group and
//! per task: it grows with distinct grants, not with leases, in memory bounded by the page.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use tokio::task::JoinHandle;

use super::{Broker, BrokerError, task_context};
use crate::attest::{AttestedIdentity, Evidence, shown};
use crate::id::SpiffeId;
use crate::policy::cedar::{Action, Principal, RequestContext, Resource};
use crate::shutdown::ShutdownSignal;
use crate::store::{
    Grant, LeaseKind, RevokeSet, Revoked, StoreError, StoredLock, StoredPrincipal, Task,
};

/// How long a principal this process wrote is taken as stored without writing it again (its
/// `seen_at` is refreshed at least this often while in use, so pruning never takes it).
const PRINCIPAL_FRESH: Duration = Duration::from_secs(600);

/// Most principals remembered as written; the memory is cleared when full.
const PRINCIPAL_CACHE: usize = 65_536;

/// How often every replica re-reads the locks (creations also arrive at once through the
/// revocation feed; deletions and expiries are taken from here).
pub const LOCK_REFRESH: Duration = Duration::from_secs(2);

/// Active tasks per page when everything live is walked (and grants per page of standalone
/// credentials).
const LIVE_PAGE: u32 = 1000;

/// Most principals kept in memory while everything live is walked.
const PRINCIPALS_KEPT: usize = 10_000;

/// One page of what is live: active tasks with their grants, or standalone grants.
struct LivePage {
    tasks: Vec<Task>,
    grants: Vec<Grant>,
}

/// How long after its first sweep a lock is swept again on each replica: a request that passed
/// the lock check just before the lock arrived may commit its credential after the first
/// sweep read what was live; the second sweep revokes it.
pub const RESWEEP_AFTER: Duration = Duration::from_secs(3);

/// The reason prefix of a lock's revocation events, which tell every replica to re-read locks.
pub const LOCKED: &str = "locked: ";

/// Longest lock reason accepted.
pub const MAX_LOCK_REASON: usize = 256;

/// Most locks at once.
pub const MAX_LOCKS: usize = 1_000;

/// Principals this process has written, and when.
#[derive(Default)]
pub(super) struct PrincipalCache(Mutex<HashMap<String, Instant>>);

impl PrincipalCache {
    fn fresh(&self, id: &str) -> bool {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(id)
            .is_some_and(|at| at.elapsed() < PRINCIPAL_FRESH)
    }

    fn written(&self, id: String) {
        let mut map = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() >= PRINCIPAL_CACHE {
            map.clear();
        }
        map.insert(id, Instant::now());
    }
}

/// What a lock matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockTarget {
    /// One SPIFFE ID.
    SpiffeId(String),
    /// Every SPIFFE ID under a path (`spiffe://td/ci/` matches `spiffe://td/ci/x`).
    SpiffePrefix(String),
    /// A claim as policy sees it (nested names joined with dots) equal to a value.
    Claim {
        /// The claim's tag name (`repository`, `kubernetes.io.namespace`).
        name: String,
        /// The value.
        value: String,
    },
    /// An attestor's subject (`uid:1000`, `https://token.actions.githubusercontent.com#repo:acme/api:ref:refs/heads/main`).
    Subject(String),
    /// An executable's SHA-256 (the `unix` attestor's `exe_sha256`).
    Executable(String),
    /// A caller address range.
    Cidr {
        /// Network address.
        addr: IpAddr,
        /// Prefix length.
        bits: u8,
    },
}

impl LockTarget {
    /// Parses the text form: `spiffe_id=ID`, `spiffe_id=PREFIX/*`, `claim:NAME=VALUE`,
    /// `subject=S`, `exe_sha256=HEX`, `cidr=ADDR/BITS`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.len() > 2048 {
            return Err(format!("lock target is {} bytes, over 2048", s.len()));
        }
        let (key, value) = s
            .split_once('=')
            .ok_or_else(|| format!("lock target {:?} is not KIND=VALUE", shown(s)))?;
        let key_shown = shown(key);
        if value.is_empty() {
            return Err(format!("lock target {key_shown:?} has an empty value"));
        }
        match key {
            "spiffe_id" => {
                let (id, prefix) = match value.strip_suffix("/*") {
                    Some(p) => (p, true),
                    None => (value, false),
                };
                let parsed: SpiffeId = id.parse().map_err(|e| format!("spiffe_id: {e}"))?;
                Ok(if prefix {
                    Self::SpiffePrefix(format!("{}/", parsed.as_str().trim_end_matches('/')))
                } else {
                    Self::SpiffeId(parsed.to_string())
                })
            }
            "subject" => Ok(Self::Subject(value.to_owned())),
            "exe_sha256" => {
                let hex = value.to_ascii_lowercase();
                if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err("exe_sha256 must be 64 hex digits".into());
                }
                Ok(Self::Executable(hex))
            }
            "cidr" => {
                let (addr, bits) = value.split_once('/').unwrap_or((value, ""));
                let addr: IpAddr = addr
                    .parse()
                    .map_err(|_| format!("cidr: {:?} is not an IP address", shown(addr)))?;
                let max = if addr.is_ipv4() { 32 } else { 128 };
                let bits = if bits.is_empty() {
                    max
                } else {
                    bits.parse::<u8>()
                        .ok()
                        .filter(|b| *b <= max)
                        .ok_or_else(|| format!("cidr: prefix length must be 0 to {max}"))?
                };
                Ok(Self::Cidr { addr, bits })
            }
            _ => match key.strip_prefix("claim:") {
                Some(name) if !name.is_empty() => Ok(Self::Claim {
                    name: name.to_owned(),
                    value: value.to_owned(),
                }),
                _ => Err(format!(
                    "unknown lock target {key_shown:?}: use spiffe_id=, claim:NAME=, subject=, \
                     exe_sha256= or cidr="
                )),
            },
        }
    }

    /// Whether this target matches a caller.
    pub fn matches(&self, who: &Who<'_>) -> bool {
        match self {
            Self::SpiffeId(id) => who.spiffe_id == id,
            Self::SpiffePrefix(prefix) => who.spiffe_id.starts_with(prefix.as_str()),
            Self::Claim { name, value } => claim_tag(who.claims, name).as_deref() == Some(value),
            Self::Subject(s) => who.subject == Some(s.as_str()),
            Self::Executable(hex) => {
                who.attestor == "unix"
                    && who.claims.get("exe_sha256").and_then(Value::as_str) == Some(hex)
            }
            Self::Cidr { addr, bits } => who.source_ip.is_some_and(|ip| in_cidr(ip, *addr, *bits)),
        }
    }
}

impl std::fmt::Display for LockTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::SpiffeId(id) => write!(f, "spiffe_id={id}"),
            Self::SpiffePrefix(p) => write!(f, "spiffe_id={p}*"),
            Self::Claim { name, value } => write!(f, "claim:{name}={value}"),
            Self::Subject(s) => write!(f, "subject={s}"),
            Self::Executable(h) => write!(f, "exe_sha256={h}"),
            Self::Cidr { addr, bits } => write!(f, "cidr={addr}/{bits}"),
        }
    }
}

/// A caller as a lock sees it: identity, attestor, subject (absent for tasks begun before
/// principals were kept), claims, address.
pub struct Who<'a> {
    /// The SPIFFE ID.
    pub spiffe_id: &'a str,
    /// The attestor's name.
    pub attestor: &'a str,
    /// The attestor's subject.
    pub subject: Option<&'a str>,
    /// The attested claims.
    pub claims: &'a Map<String, Value>,
    /// The caller's address.
    pub source_ip: Option<IpAddr>,
}

/// The value policy sees for a claim tag: nested objects joined with dots, scalars as text
/// (the same flattening as the Cedar tags, which refuse colliding names).
fn claim_tag(claims: &Map<String, Value>, name: &str) -> Option<String> {
    for (k, v) in claims {
        if k == name {
            return match v {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                Value::Bool(b) => Some(b.to_string()),
                _ => None,
            };
        }
        if let (Some(rest), Value::Object(inner)) = (
            name.strip_prefix(k.as_str())
                .and_then(|r| r.strip_prefix('.')),
            v,
        ) && let Some(found) = claim_tag(inner, rest)
        {
            return Some(found);
        }
    }
    None
}

fn in_cidr(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    fn masked(bytes: &[u8], bits: u8) -> Vec<u8> {
        bytes
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let keep = u32::from(bits).saturating_sub(8 * u32::try_from(i).unwrap_or(0));
                if keep >= 8 {
                    *b
                } else {
                    b & !(0xffu8.checked_shr(keep).unwrap_or(0))
                }
            })
            .collect()
    }
    let ip = match (ip, net) {
        (IpAddr::V6(v6), IpAddr::V4(_)) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        _ => ip,
    };
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => masked(&a.octets(), bits) == masked(&b.octets(), bits),
        (IpAddr::V6(a), IpAddr::V6(b)) => masked(&a.octets(), bits) == masked(&b.octets(), bits),
        _ => false,
    }
}

/// A lock in force: its stored form and its parsed target.
#[derive(Debug, Clone)]
pub struct Lock {
    /// As stored.
    pub stored: StoredLock,
    /// What it matches.
    pub target: LockTarget,
}

impl Lock {
    fn live(&self, now: i64) -> bool {
        self.stored.expires_at.is_none_or(|e| e > now)
    }
}

/// The locks this replica enforces, re-read from the store, and the locks created here whose
/// second sweep is still to come.
#[derive(Default)]
pub(super) struct Locks(RwLock<Arc<Vec<Lock>>>, Mutex<Vec<Lock>>);

impl Locks {
    /// Asks the lock keeper to sweep `lock` again after [`RESWEEP_AFTER`].
    fn resweep_later(&self, lock: Lock) {
        self.1
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(lock);
    }

    /// The locks to sweep again, handed to the keeper.
    fn take_resweeps(&self) -> Vec<Lock> {
        std::mem::take(
            &mut *self
                .1
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    fn current(&self) -> Arc<Vec<Lock>> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces the set; returns the locks that are new to this replica.
    fn replace(&self, locks: Vec<Lock>) -> Vec<Lock> {
        let mut current = self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let known: HashSet<&str> = current.iter().map(|l| l.stored.id.as_str()).collect();
        let new = locks
            .iter()
            .filter(|l| !known.contains(l.stored.id.as_str()))
            .cloned()
            .collect();
        *current = Arc::new(locks);
        new
    }
}

/// What re-deciding every live credential did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Redecision {
    /// Active tasks decided.
    pub tasks_decided: u64,
    /// Grants (distinct principal, identity, kind, audience, task) decided.
    pub grants_decided: u64,
    /// Live leases those grants held.
    pub leases_decided: u64,
    /// What was revoked, if anything.
    pub revoked: Option<Revoked>,
    /// How long it took.
    pub elapsed: Duration,
}

/// What creating a lock did.
#[derive(Debug, Clone)]
pub struct LockCreated {
    /// The lock.
    pub lock: StoredLock,
    /// What it revoked at once (the event is recorded even when nothing was live, so every
    /// replica learns of the lock).
    pub revoked: Revoked,
}

impl Broker {
    /// The id of the caller's stored principal, writing it first unless this process wrote
    /// it recently.
    pub(super) async fn principal_id(
        &self,
        identity: &AttestedIdentity,
        evidence: &Evidence,
    ) -> Result<String, BrokerError> {
        let p = StoredPrincipal::new(
            identity.attestor,
            &identity.subject,
            &identity.claims,
            evidence.source.map(|s| s.ip().to_string()),
        );
        if !self.principals.fresh(&p.id) {
            self.store
                .remember_principal(&p, self.clock.unix_now())
                .await?;
            self.principals.written(p.id.clone());
        }
        Ok(p.id)
    }

    /// Refuses a caller that a lock matches (checked before policy, and again before each
    /// credential is issued).
    pub(super) fn check_locks(
        &self,
        identity: &AttestedIdentity,
        spiffe_id: &SpiffeId,
        evidence: &Evidence,
    ) -> Result<(), BrokerError> {
        let locks = self.locks.current();
        if locks.is_empty() {
            return Ok(());
        }
        let who = Who {
            spiffe_id: spiffe_id.as_str(),
            attestor: identity.attestor,
            subject: Some(&identity.subject),
            claims: &identity.claims,
            source_ip: evidence.source.map(|s| s.ip()),
        };
        let now = self.clock.unix_now();
        match locks.iter().find(|l| l.live(now) && l.target.matches(&who)) {
            Some(l) => Err(BrokerError::Locked {
                lock_id: l.stored.id.clone(),
                reason: l.stored.reason.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Creates a lock: stored, enforced here at once, everything it matches that is live
    /// revoked in one event (which also tells every other replica to re-read locks).
    pub async fn create_lock(
        &self,
        target: LockTarget,
        reason: &str,
        expires_at: Option<i64>,
        created_by: &str,
    ) -> Result<LockCreated, BrokerError> {
        let bad = |reason: String| BrokerError::BadRequest {
            field: "lock",
            reason,
        };
        let reason = reason.trim();
        if reason.is_empty() || reason.len() > MAX_LOCK_REASON || reason.contains(char::is_control)
        {
            return Err(bad(format!(
                "a reason is required: 1 to {MAX_LOCK_REASON} bytes of printable text"
            )));
        }
        let now = self.clock.unix_now();
        if expires_at.is_some_and(|e| e <= now) {
            return Err(bad("the expiry is in the past".into()));
        }
        if self.store.locks().await?.len() >= MAX_LOCKS {
            return Err(bad(format!("{MAX_LOCKS} locks exist already")));
        }
        let stored = StoredLock {
            id: uuid::Uuid::now_v7().to_string(),
            target: target.to_string(),
            reason: reason.to_owned(),
            created_by: created_by.to_owned(),
            created_at: now,
            expires_at,
        };
        self.store.create_lock(stored.clone()).await?;
        let lock = Lock {
            stored: stored.clone(),
            target,
        };
        let mut all: Vec<Lock> = self.locks.current().iter().cloned().collect();
        all.push(lock.clone());
        self.locks.replace(all);
        // The lock is stored and enforced from here on; if its sweep fails, the keeper sweeps it
        // again shortly (and other replicas sweep it when they read it).
        let swept = self.sweep(&lock, true).await;
        self.locks.resweep_later(lock);
        let revoked = swept?
            .ok_or_else(|| StoreError::Unavailable("the lock's event was not recorded".into()))?;
        Ok(LockCreated {
            lock: stored,
            revoked,
        })
    }

    /// Every lock (expired ones too, until pruned), newest first.
    pub async fn list_locks(&self) -> Result<Vec<StoredLock>, BrokerError> {
        Ok(self.store.locks().await?)
    }

    /// Deletes a lock; `false` if there was none. Other replicas stop enforcing it within
    /// [`LOCK_REFRESH`].
    pub async fn delete_lock(&self, id: &str) -> Result<bool, BrokerError> {
        let deleted = self.store.delete_lock(id).await?;
        self.refresh_locks().await?;
        Ok(deleted)
    }

    /// Re-reads the locks from the store; returns those new to this replica. A stored lock
    /// whose target no longer parses is skipped (and logged).
    pub async fn refresh_locks(&self) -> Result<Vec<Lock>, BrokerError> {
        let stored = self.store.locks().await?;
        let mut locks = Vec::with_capacity(stored.len());
        for s in stored {
            match LockTarget::parse(&s.target) {
                Ok(target) => locks.push(Lock { stored: s, target }),
                Err(e) => {
                    tracing::error!(lock_id = %s.id, error = %e, "stored lock is unreadable; not enforced")
                }
            }
        }
        ::metrics::gauge!(crate::telemetry::LOCKS).set(locks.len() as f64);
        Ok(self.locks.replace(locks))
    }

    /// Revokes everything live that `lock` matches, in one event with its reason; with
    /// `announce`, the event is recorded even when nothing matched.
    async fn sweep(&self, lock: &Lock, announce: bool) -> Result<Option<Revoked>, BrokerError> {
        let now = self.clock.unix_now();
        if !lock.live(now) && !announce {
            return Ok(None);
        }
        let matched = |who: &Who<'_>| lock.target.matches(who);
        let mut set = RevokeSet::default();
        self.walk_live(|page, principals| {
            for t in &page.tasks {
                let principal = t.principal.as_ref().and_then(|p| principals.get(p));
                if matched(&task_who(t, principal)) {
                    set.tasks.push(t.id.clone());
                }
            }
            for g in &page.grants {
                if let Some(p) = principals.get(&g.principal)
                    && matched(&principal_who(&g.spiffe_id, p))
                {
                    set.grants.push(g.clone());
                }
            }
        })
        .await?;
        set.announce = announce;
        let reason = format!("{LOCKED}{}", lock.stored.reason);
        let revoked = self.store.revoke_set(set, &reason, now).await?;
        if let Some(r) = &revoked {
            crate::telemetry::revoked("locked");
            self.bus.publish(r.event.clone());
            tracing::info!(target: "ephemera::audit", action = "Lock", lock_id = %lock.stored.id, tasks = r.task_ids.len(), credentials = r.leases, reason = %reason, "locked: live credentials revoked");
        }
        Ok(revoked)
    }

    /// Walks everything live a page at a time, so memory stays bounded whatever the number of
    /// tasks and leases: each page of active tasks with those tasks' grants, then the
    /// standalone grants. `visit` gets each page and the principals it names (read once each,
    /// kept while there are fewer than [`PRINCIPALS_KEPT`]).
    async fn walk_live(
        &self,
        mut visit: impl FnMut(&LivePage, &HashMap<String, StoredPrincipal>),
    ) -> Result<(), BrokerError> {
        let mut principals: HashMap<String, StoredPrincipal> = HashMap::new();
        let mut after = None;
        loop {
            let tasks = self.store.active_tasks(after.clone(), LIVE_PAGE).await?;
            let Some(last) = tasks.last() else { break };
            after = Some(last.id.clone());
            let ids = tasks.iter().map(|t| t.id.clone()).collect();
            let grants = self
                .store
                .live_grants(self.clock.unix_now(), Some(ids))
                .await?;
            let page = LivePage { tasks, grants };
            self.read_principals(&page, &mut principals).await?;
            visit(&page, &principals);
        }
        let grants = self.store.live_grants(self.clock.unix_now(), None).await?;
        for chunk in grants.chunks(LIVE_PAGE as usize) {
            let page = LivePage {
                tasks: Vec::new(),
                grants: chunk.to_vec(),
            };
            self.read_principals(&page, &mut principals).await?;
            visit(&page, &principals);
        }
        Ok(())
    }

    /// Reads the principals a page names that `known` lacks.
    async fn read_principals(
        &self,
        page: &LivePage,
        known: &mut HashMap<String, StoredPrincipal>,
    ) -> Result<(), BrokerError> {
        let mut missing: Vec<String> = page
            .grants
            .iter()
            .map(|g| &g.principal)
            .chain(page.tasks.iter().filter_map(|t| t.principal.as_ref()))
            .filter(|id| !known.contains_key(*id))
            .cloned()
            .collect();
        missing.sort_unstable();
        missing.dedup();
        if missing.is_empty() {
            return Ok(());
        }
        if known.len() + missing.len() > PRINCIPALS_KEPT {
            known.clear();
            // The page's own principals are read again below.
            missing = page
                .grants
                .iter()
                .map(|g| g.principal.clone())
                .chain(page.tasks.iter().filter_map(|t| t.principal.clone()))
                .collect();
            missing.sort_unstable();
            missing.dedup();
        }
        for p in self.store.principals(missing).await? {
            known.insert(p.id.clone(), p);
        }
        Ok(())
    }

    /// [`Self::redecide`] once per policy generation, whoever asks first (the reloader, an
    /// admin's reload): the others wait for it and get its result.
    pub async fn redecide_policy(&self) -> Result<Redecision, BrokerError> {
        let generation = self.policy.generation();
        let mut last = self.redecided.lock().await;
        if let Some((done, r)) = &*last
            && *done >= generation
        {
            return Ok(r.clone());
        }
        let r = self.redecide().await?;
        *last = Some((generation, r.clone()));
        Ok(r)
    }

    /// [`Self::redecide`] after new mapping rules, in turn with policy re-decisions.
    pub async fn redecide_mapping(&self) -> Result<Redecision, BrokerError> {
        let _turn = self.redecided.lock().await;
        self.redecide().await
    }

    /// Decides every live task and credential again under the policy and mapping rules in
    /// force now; what is no longer permitted is revoked in one event with reason `policy`.
    /// Credentials are decided as they were asked for (same principal, identity, kind,
    /// audience, task; the lifetime they have left); the evidence's age is taken as it was
    /// for tasks and as 0 for credentials (a credential does not record it).
    async fn redecide(&self) -> Result<Redecision, BrokerError> {
        let started = Instant::now();
        let now = self.clock.unix_now();
        let mapper = self.mapper();
        let mut out = Redecision::default();
        let mut set = RevokeSet::default();
        self.walk_live(|page, principals| {
            out.tasks_decided += page.tasks.len() as u64;
            let mut denied = HashSet::new();
            for t in &page.tasks {
                let principal = principals.get(t.principal.as_deref().unwrap_or(""));
                if !self.still_permits_task(t, principal, &mapper, now) {
                    tracing::info!(target: "ephemera::audit", action = "ReevaluateTask", task_id = %t.id, spiffe_id = %t.spiffe_id, decision = "deny", reason = "policy no longer permits the task", "decision");
                    set.tasks.push(t.id.clone());
                    denied.insert(t.id.as_str());
                }
            }
            let tasks: HashMap<&str, &Task> =
                page.tasks.iter().map(|t| (t.id.as_str(), t)).collect();
            for g in &page.grants {
                out.grants_decided += 1;
                out.leases_decided += g.leases;
                let task = match g.task_id.as_deref() {
                    // Ending with its task in this set.
                    Some(id) if denied.contains(id) => continue,
                    Some(id) => match tasks.get(id) {
                        Some(t) => Some(*t),
                        None => continue,
                    },
                    None => None,
                };
                let permitted = principals
                    .get(&g.principal)
                    .is_some_and(|p| self.still_permits_grant(g, p, task, &mapper, now));
                if !permitted {
                    tracing::info!(target: "ephemera::audit", action = "ReevaluateCredentials", spiffe_id = %g.spiffe_id, kind = g.kind.as_str(), credentials = g.leases, task_id = g.task_id.as_deref(), decision = "deny", reason = "policy no longer permits the credentials", "decision");
                    set.grants.push(g.clone());
                }
            }
        })
        .await?;
        if !set.is_empty() {
            out.revoked = self.store.revoke_set(set, "policy", now).await?;
            if let Some(r) = &out.revoked {
                crate::telemetry::revoked("policy");
                self.bus.publish(r.event.clone());
            }
        }
        out.elapsed = started.elapsed();
        Ok(out)
    }

    /// Whether the mapping rules still give the owner its identity and policy still permits
    /// the task. A task without a stored principal is decided on its stored claims.
    fn still_permits_task(
        &self,
        t: &Task,
        principal: Option<&StoredPrincipal>,
        mapper: &crate::policy::Mapper,
        now: i64,
    ) -> bool {
        let Ok(spiffe_id) = t.spiffe_id.parse::<SpiffeId>() else {
            return false;
        };
        if let Some(p) = principal
            && !still_mapped(mapper, p, &spiffe_id)
        {
            return false;
        }
        let ctx = RequestContext {
            source_ip: t.source_ip.as_deref().and_then(|ip| ip.parse().ok()),
            requested_ttl_secs: u64::try_from(t.deadline - now).unwrap_or(0),
            evidence_age_secs: u64::try_from(t.evidence_age_secs).unwrap_or(0),
            now: self.clock.now(),
            task: Some(task_context(t, now)),
            // Re-evaluation decides on what the task is; recent behaviour is for requests as
            // they arrive.
            behaviour: None,
        };
        let principal = Principal {
            spiffe_id: &spiffe_id,
            attestor: &t.attestor,
            claims: &t.claims,
        };
        self.permits(
            &principal,
            Action::BeginTask,
            &[Resource::Target("task".into())],
            &ctx,
        )
    }

    /// Whether the mapping rules and policy still permit a grant's credentials.
    fn still_permits_grant(
        &self,
        g: &Grant,
        p: &StoredPrincipal,
        task: Option<&Task>,
        mapper: &crate::policy::Mapper,
        now: i64,
    ) -> bool {
        let Ok(spiffe_id) = g.spiffe_id.parse::<SpiffeId>() else {
            return false;
        };
        if !still_mapped(mapper, p, &spiffe_id) {
            return false;
        }
        let (action, resources) = match g.kind {
            LeaseKind::X509 => (
                Action::MintX509Svid,
                vec![Resource::Target("x509-svid".into())],
            ),
            LeaseKind::Jwt => (
                Action::MintJwtSvid,
                g.audience
                    .iter()
                    .map(|a| Resource::Audience(a.clone()))
                    .collect(),
            ),
        };
        let ctx = RequestContext {
            source_ip: p.source_ip.as_deref().and_then(|ip| ip.parse().ok()),
            requested_ttl_secs: u64::try_from(g.expires_at - now).unwrap_or(0),
            evidence_age_secs: 0,
            now: self.clock.now(),
            task: task.map(|t| task_context(t, now)),
            behaviour: None,
        };
        let principal = Principal {
            spiffe_id: &spiffe_id,
            attestor: &p.attestor,
            claims: &p.claims,
        };
        self.permits(&principal, action, &resources, &ctx)
    }

    /// Whether policy permits `action` on every resource; an evaluation error denies.
    fn permits(
        &self,
        principal: &Principal<'_>,
        action: Action,
        resources: &[Resource],
        ctx: &RequestContext,
    ) -> bool {
        resources.iter().all(|r| match self.policy.decide(principal, action, r, ctx) {
            Ok(d) => d.allowed,
            Err(e) => {
                tracing::warn!(spiffe_id = %principal.spiffe_id, error = %e, "cannot decide again; revoking");
                false
            }
        })
    }
}

/// Whether the mapping rules still give a stored principal `spiffe_id`.
fn still_mapped(mapper: &crate::policy::Mapper, p: &StoredPrincipal, spiffe_id: &SpiffeId) -> bool {
    let Some(attestor) = crate::attest::static_name(&p.attestor) else {
        return false;
    };
    let identity = AttestedIdentity {
        attestor,
        subject: p.subject.clone(),
        claims: p.claims.clone(),
        issued_at: None,
        expires_at: None,
        single_use: None,
    };
    mapper
        .map(&identity)
        .is_ok_and(|ids| ids.contains(spiffe_id))
}

fn task_who<'a>(t: &'a Task, p: Option<&'a StoredPrincipal>) -> Who<'a> {
    Who {
        spiffe_id: &t.spiffe_id,
        attestor: &t.attestor,
        subject: p.map(|p| p.subject.as_str()),
        claims: &t.claims,
        source_ip: t.source_ip.as_deref().and_then(|ip| ip.parse().ok()),
    }
}

fn principal_who<'a>(spiffe_id: &'a str, p: &'a StoredPrincipal) -> Who<'a> {
    Who {
        spiffe_id,
        attestor: &p.attestor,
        subject: Some(&p.subject),
        claims: &p.claims,
        source_ip: p.source_ip.as_deref().and_then(|ip| ip.parse().ok()),
    }
}

/// The lock keeper: a worker that re-reads the locks every [`LOCK_REFRESH`] and at once when
/// a lock's event arrives (from this replica or another), and sweeps for locks new to this
/// replica, so a credential it issued before it learned of a lock is revoked too.
pub struct LockKeeper {
    /// The broker whose locks are kept.
    pub broker: Arc<Broker>,
}

impl LockKeeper {
    /// Starts the worker; it stops at `shutdown`.
    pub fn start(self, mut shutdown: ShutdownSignal) -> JoinHandle<()> {
        tokio::spawn(async move {
            let broker = self.broker;
            let mut events = broker.bus.subscribe();
            let mut tick = tokio::time::interval(LOCK_REFRESH);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // Locks new to this replica whose sweep has not succeeded yet (they are enforced
            // meanwhile; the sweep is retried at each refresh).
            let mut unswept: Vec<Lock> = Vec::new();
            // Locks swept once, to be swept again when their time comes.
            let mut again: Vec<(tokio::time::Instant, Lock)> = Vec::new();
            loop {
                tokio::select! {
                    () = shutdown.wait() => return,
                    _ = tick.tick() => {}
                    ev = events.recv() => match ev {
                        Ok(r) if r.reason.starts_with(LOCKED) => {}
                        Ok(_) => continue,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    },
                }
                match broker.refresh_locks().await {
                    Ok(new) => unswept.extend(new),
                    Err(e) => tracing::warn!(error = %e, "cannot re-read locks"),
                }
                let now = tokio::time::Instant::now();
                again.extend(
                    broker
                        .locks
                        .take_resweeps()
                        .into_iter()
                        .map(|l| (now + RESWEEP_AFTER, l)),
                );
                let mut failed = Vec::new();
                for lock in unswept.drain(..) {
                    match broker.sweep(&lock, false).await {
                        Ok(_) => again.push((now + RESWEEP_AFTER, lock)),
                        Err(e) => {
                            tracing::warn!(lock_id = %lock.stored.id, error = %e, "cannot revoke what a new lock matches; retrying");
                            failed.push(lock);
                        }
                    }
                }
                unswept = failed;
                let (due, later): (Vec<_>, Vec<_>) =
                    again.drain(..).partition(|(at, _)| *at <= now);
                again = later;
                let enforced = broker.locks.current();
                for (_, lock) in due {
                    // Deleted since: nothing more to revoke for it.
                    if !enforced.iter().any(|l| l.stored.id == lock.stored.id) {
                        continue;
                    }
                    if let Err(e) = broker.sweep(&lock, false).await {
                        tracing::warn!(lock_id = %lock.stored.id, error = %e, "cannot sweep a lock again; retrying");
                        again.push((now + LOCK_REFRESH, lock));
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn who<'a>(spiffe_id: &'a str, claims: &'a Map<String, Value>, ip: Option<&str>) -> Who<'a> {
        Who {
            spiffe_id,
            attestor: "unix",
            subject: Some("uid:1000"),
            claims,
            source_ip: ip.map(|i| i.parse().unwrap_or_else(|_| unreachable!())),
        }
    }

    fn target(s: &str) -> LockTarget {
        LockTarget::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn targets_parse_print_and_match() {
        let claims = json!({"repository": "acme/api", "kubernetes.io": {"namespace": "ci"},
                            "exe_sha256": "ab".repeat(32), "n": 7})
        .as_object()
        .cloned()
        .unwrap_or_default();
        let w = who("spiffe://td/ci/build", &claims, Some("10.1.2.3"));
        for (t, hit) in [
            ("spiffe_id=spiffe://td/ci/build", true),
            ("spiffe_id=spiffe://td/ci/*", true),
            ("spiffe_id=spiffe://td/c/*", false),
            ("spiffe_id=spiffe://td/ci", false),
            ("claim:repository=acme/api", true),
            ("claim:repository=acme/web", false),
            ("claim:kubernetes.io.namespace=ci", true),
            ("claim:n=7", true),
            ("subject=uid:1000", true),
            ("subject=uid:0", false),
            (&format!("exe_sha256={}", "AB".repeat(32)), true),
            ("cidr=10.0.0.0/8", true),
            ("cidr=10.1.2.3", true),
            ("cidr=192.168.0.0/16", false),
            ("cidr=::/0", false),
        ] {
            let parsed = target(t);
            assert_eq!(parsed.matches(&w), hit, "{t}");
            assert_eq!(target(&parsed.to_string()), parsed, "{t} round trip");
        }
        let unix = who("spiffe://td/ci/build", &claims, None);
        assert!(
            !target("cidr=0.0.0.0/0").matches(&unix),
            "no address, no match"
        );
        let mapped = who("spiffe://td/x", &claims, Some("::ffff:10.1.2.3"));
        assert!(target("cidr=10.1.0.0/16").matches(&mapped));
    }

    #[test]
    fn bad_targets_say_what_is_wrong() {
        for (t, says) in [
            ("spiffe_id", "KIND=VALUE"),
            ("spiffe_id=", "empty"),
            ("spiffe_id=http://x/y", "spiffe_id"),
            ("exe_sha256=abc", "64 hex"),
            ("cidr=10.0.0.0/33", "0 to 32"),
            ("cidr=nope", "not an IP"),
            ("colour=red", "unknown lock target"),
            ("claim:=x", "unknown lock target"),
        ] {
            let err = LockTarget::parse(t).err().unwrap_or_default();
            assert!(err.contains(says), "{t}: {err}");
        }
    }
}
