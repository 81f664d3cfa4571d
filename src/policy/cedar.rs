//! Cedar authorization: loads and validates policy files, decides each action, reloads safely.
//!
//! Policies live in `*.cedar` files in one directory and are validated (strict mode) against the
//! built-in schema (`schema.cedarschema`). Each policy is named by its `@id` annotation (or
//! `<file>#<n>`), so decisions report which policies determined them. Deny by default: with no
//! policy that permits, the answer is deny. A reload that fails to parse or validate is refused
//! and the previous policies keep serving.

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use cedar_policy::{
    Authorizer, Context, Decision as CedarDecision, Entities, Entity, EntityId, EntityTypeName,
    EntityUid, PolicyId, PolicySet, Request, RestrictedExpression, Schema, ValidationMode,
    Validator,
};
use miette::Diagnostic;
use serde_json::{Map, Value};

use crate::id::SpiffeId;

/// The schema every policy is validated against.
pub const SCHEMA: &str = include_str!("schema.cedarschema");

/// Most claims turned into entity tags for one request; more are refused.
pub const MAX_CLAIM_TAGS: usize = 256;

/// One problem in a policy directory, located by file and line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyProblem {
    /// The file (or the directory, for problems with no single file).
    pub file: PathBuf,
    /// 1-based line, where known.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for PolicyProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{l}: {}", self.file.display(), self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

/// Why a policy decision could not be made or was negative.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// No policy permits the request, or a forbid policy applies.
    #[error("denied by policy: {reason}")]
    Denied {
        /// The determining policies (`forbid` ids), or "no policy permits".
        reason: String,
    },
    /// The request could not be expressed to Cedar (e.g. too many claims).
    #[error("policy request could not be built: {0}")]
    Request(String),
}

/// An action the broker authorizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Starting a task.
    BeginTask,
    /// Minting an X.509-SVID.
    MintX509Svid,
    /// Minting a JWT-SVID.
    MintJwtSvid,
}

impl Action {
    /// The Cedar action name.
    pub fn name(self) -> &'static str {
        match self {
            Self::BeginTask => "BeginTask",
            Self::MintX509Svid => "MintX509Svid",
            Self::MintJwtSvid => "MintJwtSvid",
        }
    }

    /// Parses a Cedar action name.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::BeginTask, Self::MintX509Svid, Self::MintJwtSvid]
            .into_iter()
            .find(|a| a.name() == s)
    }
}

/// What the action is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resource {
    /// A JWT audience.
    Audience(String),
    /// A named target (`x509-svid`, `task`).
    Target(String),
}

/// The workload asking.
#[derive(Debug, Clone)]
pub struct Principal<'a> {
    /// Its SPIFFE ID.
    pub spiffe_id: &'a SpiffeId,
    /// The attestor that verified it.
    pub attestor: &'a str,
    /// Its attested claims.
    pub claims: &'a Map<String, Value>,
}

/// The task a request belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskContext {
    /// Task id.
    pub id: String,
    /// `key=value` labels.
    pub labels: Vec<String>,
    /// The task's declared scopes.
    pub scopes: Vec<String>,
    /// Seconds since the task began.
    pub age_secs: u64,
}

/// Everything about the request that is not who or what.
#[derive(Debug, Clone)]
pub struct RequestContext {
    /// Caller address (absent on the Unix socket).
    pub source_ip: Option<IpAddr>,
    /// Lifetime asked for.
    pub requested_ttl_secs: u64,
    /// Age of the evidence.
    pub evidence_age_secs: u64,
    /// Time of the request.
    pub now: SystemTime,
    /// The task, if any.
    pub task: Option<TaskContext>,
    /// The identity's recent behaviour on this broker, when a policy reads it.
    pub behaviour: Option<BehaviourContext>,
}

/// What policy sees of an identity's recent behaviour (`context.behaviour`), as this broker
/// replica has seen it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct BehaviourContext {
    /// Credentials issued to the identity in the last minute.
    pub issued_last_minute: u64,
    /// Requests of the identity denied in the last ten minutes.
    pub denials_last_10_minutes: u64,
    /// The identity's live tasks.
    pub live_tasks: u64,
    /// Credentials in the request's task (0 without one).
    pub task_leases: u64,
}

/// Whether a policy set reads `context.behaviour`.
fn reads_behaviour(set: &PolicySet) -> bool {
    set.policies().any(|p| p.to_string().contains("behaviour"))
}

/// A decision and what determined it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Allowed?
    pub allowed: bool,
    /// Ids of the policies that determined the decision (empty for default deny).
    pub policies: Vec<String>,
    /// Policy evaluation errors (a policy that errors is skipped, as Cedar specifies).
    pub errors: Vec<String>,
}

impl Decision {
    /// The reason of a deny: the determining policies, or "no policy permits".
    pub fn deny_reason(&self) -> String {
        if self.policies.is_empty() {
            "no policy permits".to_owned()
        } else {
            format!("forbidden by {}", self.policies.join(", "))
        }
    }
}

/// Flattens claims into string tags: nested objects become dotted keys, scalars their text;
/// arrays and nulls are left out (match them in identity mapping instead).
fn claim_tags(
    claims: &Map<String, Value>,
) -> Result<Vec<(String, RestrictedExpression)>, PolicyError> {
    fn walk(prefix: &str, map: &Map<String, Value>, out: &mut Vec<(String, RestrictedExpression)>) {
        for (k, v) in map {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                Value::String(s) => out.push((key, RestrictedExpression::new_string(s.clone()))),
                Value::Number(n) => {
                    out.push((key, RestrictedExpression::new_string(n.to_string())))
                }
                Value::Bool(b) => out.push((key, RestrictedExpression::new_string(b.to_string()))),
                Value::Object(inner) => walk(&key, inner, out),
                Value::Array(_) | Value::Null => {}
            }
        }
    }
    let mut out = Vec::new();
    walk("", claims, &mut out);
    // Attestors refuse such claims; a principal whose claims collide anyway is never decided
    // on whichever of the two values came last.
    let mut names: Vec<&str> = out.iter().map(|(k, _)| k.as_str()).collect();
    names.sort_unstable();
    if names.windows(2).any(|w| w[0] == w[1]) {
        return Err(PolicyError::Request(
            "two claims have the same name once nested names are joined with dots".into(),
        ));
    }
    if out.len() > MAX_CLAIM_TAGS {
        return Err(PolicyError::Request(format!(
            "{} claims, more than the {MAX_CLAIM_TAGS} allowed",
            out.len()
        )));
    }
    Ok(out)
}

/// RFC 3339 in whole seconds, the form Cedar's `datetime` accepts.
fn cedar_datetime(t: SystemTime) -> String {
    let secs = crate::clock::unix_secs(t);
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".to_owned())
}

fn long(v: u64) -> RestrictedExpression {
    RestrictedExpression::new_long(i64::try_from(v).unwrap_or(i64::MAX))
}

/// Loaded, validated policies.
struct Loaded {
    set: PolicySet,
    count: usize,
    /// Whether any policy reads `context.behaviour` (only then is it gathered).
    behaviour: bool,
    fingerprint: Vec<(PathBuf, SystemTime, u64)>,
}

/// The policy engine: current policies, the schema, and the directory they come from.
pub struct PolicyEngine {
    dir: PathBuf,
    schema: Schema,
    authorizer: Authorizer,
    names: Names,
    principals: Principals,
    contexts: Contexts,
    current: RwLock<Arc<Loaded>>,
    generation: tokio::sync::watch::Sender<u64>,
}

/// Names and values parsed once, not per request: Cedar parses entity type names and builds
/// extension values with its full grammar, which cost more than the rest of a decision.
struct Names {
    workload: EntityTypeName,
    audience: EntityTypeName,
    target: EntityTypeName,
    actions: [EntityUid; 3],
    /// `context.now`, rebuilt once a second.
    now: std::sync::Mutex<(i64, RestrictedExpression)>,
    /// `context.source_ip` per address, bounded.
    ips: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, RestrictedExpression>>,
}

/// Most source addresses whose Cedar value is kept.
const IP_CACHE: usize = 4096;

impl Names {
    fn new() -> Result<Self, String> {
        let t = |n: &str| EntityTypeName::from_str(n).map_err(|e| e.to_string());
        let action = t("Ephemera::Action")?;
        let act =
            |a: Action| EntityUid::from_type_name_and_id(action.clone(), EntityId::new(a.name()));
        Ok(Self {
            workload: t("Ephemera::Workload")?,
            audience: t("Ephemera::Audience")?,
            target: t("Ephemera::Target")?,
            actions: [
                act(Action::BeginTask),
                act(Action::MintX509Svid),
                act(Action::MintJwtSvid),
            ],
            now: std::sync::Mutex::new((i64::MIN, RestrictedExpression::new_long(0))),
            ips: std::sync::Mutex::default(),
        })
    }

    fn action(&self, a: Action) -> EntityUid {
        self.actions[match a {
            Action::BeginTask => 0,
            Action::MintX509Svid => 1,
            Action::MintJwtSvid => 2,
        }]
        .clone()
    }

    fn resource(&self, r: &Resource) -> EntityUid {
        let (t, id) = match r {
            Resource::Audience(a) => (&self.audience, a),
            Resource::Target(t) => (&self.target, t),
        };
        EntityUid::from_type_name_and_id(t.clone(), EntityId::new(id))
    }

    fn now(&self, t: SystemTime) -> RestrictedExpression {
        let secs = crate::clock::unix_secs(t);
        let mut now = self
            .now
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if now.0 != secs {
            *now = (secs, RestrictedExpression::new_datetime(cedar_datetime(t)));
        }
        now.1.clone()
    }

    fn ip(&self, ip: std::net::IpAddr) -> RestrictedExpression {
        let mut ips = self
            .ips
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if ips.len() >= IP_CACHE && !ips.contains_key(&ip) {
            ips.clear();
        }
        ips.entry(ip)
            .or_insert_with(|| RestrictedExpression::new_ip(ip.to_string()))
            .clone()
    }
}

/// The built-in schema, parsed.
pub fn schema() -> Result<Schema, String> {
    Schema::from_cedarschema_str(SCHEMA)
        .map(|(s, _warnings)| s)
        .map_err(|e| format!("built-in schema: {e}"))
}

/// Line number (1-based) of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> Option<usize> {
    (offset <= text.len()).then(|| text[..offset].matches('\n').count() + 1)
}

fn first_label_offset(d: &dyn Diagnostic) -> Option<usize> {
    d.labels().and_then(|mut l| l.next()).map(|l| l.offset())
}

fn fingerprint(dir: &Path) -> Vec<(PathBuf, SystemTime, u64)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "cedar"))
        .filter_map(|p| {
            let m = std::fs::metadata(&p).ok()?;
            Some((p, m.modified().ok()?, m.len()))
        })
        .collect();
    out.sort();
    out
}

/// Reads and validates every `*.cedar` file in `dir`. Every problem is returned, with its file
/// and line. A missing directory holds no policies (and so denies everything).
pub fn load_dir(dir: &Path, schema: &Schema) -> Result<(PolicySet, usize), Vec<PolicyProblem>> {
    let mut problems = Vec::new();
    let mut set = PolicySet::new();
    let mut sources: Vec<(PolicyId, PathBuf, String)> = Vec::new();
    let mut seen = HashSet::new();
    let files: Vec<PathBuf> = fingerprint(dir).into_iter().map(|(p, _, _)| p).collect();
    if dir.exists() && !dir.is_dir() {
        return Err(vec![PolicyProblem {
            file: dir.to_owned(),
            line: None,
            message: "not a directory".into(),
        }]);
    }
    for file in files {
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) => {
                problems.push(PolicyProblem {
                    file,
                    line: None,
                    message: e.to_string(),
                });
                continue;
            }
        };
        let parsed = match PolicySet::from_str(&text) {
            Ok(p) => p,
            Err(errs) => {
                for e in errs.iter() {
                    problems.push(PolicyProblem {
                        file: file.clone(),
                        line: first_label_offset(e).and_then(|o| line_of(&text, o)),
                        message: e.to_string(),
                    });
                }
                continue;
            }
        };
        if parsed.templates().next().is_some() {
            problems.push(PolicyProblem {
                file: file.clone(),
                line: None,
                message: "policy templates are not supported".into(),
            });
        }
        let stem = file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        for (n, policy) in parsed.policies().enumerate() {
            let id = policy
                .annotation("id")
                .map(str::to_owned)
                .unwrap_or_else(|| format!("{stem}#{n}"));
            let line = text
                .find(&format!("@id(\"{id}\")"))
                .and_then(|o| line_of(&text, o));
            if !seen.insert(id.clone()) {
                problems.push(PolicyProblem {
                    file: file.clone(),
                    line,
                    message: format!("duplicate policy id {id:?}"),
                });
                continue;
            }
            let pid = PolicyId::new(&id);
            if let Err(e) = set.add(policy.new_id(pid.clone())) {
                problems.push(PolicyProblem {
                    file: file.clone(),
                    line,
                    message: e.to_string(),
                });
            }
            sources.push((pid, file.clone(), text.clone()));
        }
    }
    if problems.is_empty() {
        let result = Validator::new(schema.clone()).validate(&set, ValidationMode::Strict);
        for e in result.validation_errors() {
            let (file, line) = sources
                .iter()
                .find(|(id, _, _)| id == e.policy_id())
                .map(|(_, f, text)| {
                    (
                        f.clone(),
                        first_label_offset(e).and_then(|o| line_of(text, o)),
                    )
                })
                .unwrap_or_else(|| (dir.to_owned(), None));
            problems.push(PolicyProblem {
                file,
                line,
                message: format!("policy {}: {e}", e.policy_id()),
            });
        }
    }
    if problems.is_empty() {
        let count = sources.len();
        Ok((set, count))
    } else {
        Err(problems)
    }
}

impl PolicyEngine {
    /// Loads the policies in `dir`; fails with every problem when they do not validate.
    pub fn load(dir: &Path) -> Result<Self, Vec<PolicyProblem>> {
        let schema = schema().map_err(|message| {
            vec![PolicyProblem {
                file: PathBuf::from("schema.cedarschema"),
                line: None,
                message,
            }]
        })?;
        let fp = fingerprint(dir);
        let (set, count) = load_dir(dir, &schema)?;
        if count == 0 {
            tracing::warn!(dir = %dir.display(), "no policies loaded: every request will be denied");
        }
        let names = Names::new().map_err(|message| {
            vec![PolicyProblem {
                file: PathBuf::from("schema.cedarschema"),
                line: None,
                message,
            }]
        })?;
        Ok(Self {
            dir: dir.to_owned(),
            schema,
            authorizer: Authorizer::new(),
            names,
            principals: Principals::default(),
            contexts: Contexts::default(),
            current: RwLock::new(Arc::new(Loaded {
                behaviour: reads_behaviour(&set),
                set,
                count,
                fingerprint: fp,
            })),
            generation: tokio::sync::watch::channel(0).0,
        })
    }

    /// The policy directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Number of policies serving now.
    pub fn count(&self) -> usize {
        self.loaded().count
    }

    /// Whether a policy serving now reads `context.behaviour`: only then is the caller's
    /// recent behaviour gathered and kept.
    pub fn uses_behaviour(&self) -> bool {
        self.loaded().behaviour
    }

    fn loaded(&self) -> Arc<Loaded> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Subscribes to reloads: the value is the number of successful reloads so far.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// How many times policies have been (successfully) reloaded.
    pub fn generation(&self) -> u64 {
        *self.generation.borrow()
    }

    /// Reloads from the directory. On any problem the previous policies keep serving and the
    /// problems are returned (and logged).
    pub fn reload(&self) -> Result<usize, Vec<PolicyProblem>> {
        let fp = fingerprint(&self.dir);
        match load_dir(&self.dir, &self.schema) {
            Ok((set, count)) => {
                *self
                    .current
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(Loaded {
                    behaviour: reads_behaviour(&set),
                    set,
                    count,
                    fingerprint: fp,
                });
                self.generation.send_modify(|g| *g += 1);
                tracing::info!(dir = %self.dir.display(), policies = count, "policies reloaded");
                Ok(count)
            }
            Err(problems) => {
                for p in &problems {
                    tracing::error!(problem = %p, "policy reload refused; previous policies keep serving");
                }
                // Remember the broken files so they are not re-parsed every poll.
                let current = self.loaded();
                *self
                    .current
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(Loaded {
                    set: current.set.clone(),
                    count: current.count,
                    behaviour: current.behaviour,
                    fingerprint: fp,
                });
                Err(problems)
            }
        }
    }

    /// Reloads if any policy file was added, removed or changed since the last load.
    pub fn reload_if_changed(&self) -> Option<Result<usize, Vec<PolicyProblem>>> {
        (fingerprint(&self.dir) != self.loaded().fingerprint).then(|| self.reload())
    }

    /// Decides one action.
    pub fn decide(
        &self,
        principal: &Principal<'_>,
        action: Action,
        resource: &Resource,
        ctx: &RequestContext,
    ) -> Result<Decision, PolicyError> {
        let principal = self.principals.get(principal, &self.names.workload)?;
        // The request is built here from typed values, the same way every time; the schema
        // test below checks that it conforms, so it is not validated again per request.
        let request = self.request(&principal.uid, action, resource, ctx, None)?;
        let response =
            self.authorizer
                .is_authorized(&request, &self.loaded().set, &principal.entities);
        let diag = response.diagnostics();
        Ok(Decision {
            allowed: response.decision() == CedarDecision::Allow,
            policies: diag.reason().map(ToString::to_string).collect(),
            errors: diag.errors().map(ToString::to_string).collect(),
        })
    }

    /// The Cedar request for `action` on `resource` by the principal `uid`; validated against
    /// `schema` when one is given.
    fn request(
        &self,
        uid: &EntityUid,
        action: Action,
        resource: &Resource,
        ctx: &RequestContext,
        schema: Option<&Schema>,
    ) -> Result<Request, PolicyError> {
        Request::new(
            uid.clone(),
            self.names.action(action),
            self.names.resource(resource),
            self.contexts.get(ctx, |ctx| self.context(ctx))?,
            schema,
        )
        .map_err(|e| PolicyError::Request(e.to_string()))
    }

    /// `context` of a request, built from Cedar expressions (and evaluated by Cedar).
    fn context(&self, ctx: &RequestContext) -> Result<Context, PolicyError> {
        let mut pairs = vec![
            (
                "requested_ttl_secs".to_owned(),
                long(ctx.requested_ttl_secs),
            ),
            ("evidence_age_secs".to_owned(), long(ctx.evidence_age_secs)),
            ("now".to_owned(), self.names.now(ctx.now)),
        ];
        if let Some(ip) = ctx.source_ip {
            pairs.push(("source_ip".to_owned(), self.names.ip(ip)));
        }
        if let Some(task) = &ctx.task {
            pairs.push((
                "task".to_owned(),
                RestrictedExpression::new_record([
                    (
                        "id".to_owned(),
                        RestrictedExpression::new_string(task.id.clone()),
                    ),
                    (
                        "labels".to_owned(),
                        RestrictedExpression::new_set(
                            task.labels
                                .iter()
                                .map(|l| RestrictedExpression::new_string(l.clone())),
                        ),
                    ),
                    (
                        "scopes".to_owned(),
                        RestrictedExpression::new_set(
                            task.scopes
                                .iter()
                                .map(|s| RestrictedExpression::new_string(s.clone())),
                        ),
                    ),
                    ("age_secs".to_owned(), long(task.age_secs)),
                ])
                .map_err(|e| PolicyError::Request(e.to_string()))?,
            ));
        }
        if let Some(b) = &ctx.behaviour {
            pairs.push((
                "behaviour".to_owned(),
                RestrictedExpression::new_record([
                    ("issued_last_minute".to_owned(), long(b.issued_last_minute)),
                    (
                        "denials_last_10_minutes".to_owned(),
                        long(b.denials_last_10_minutes),
                    ),
                    ("live_tasks".to_owned(), long(b.live_tasks)),
                    ("task_leases".to_owned(), long(b.task_leases)),
                ])
                .map_err(|e| PolicyError::Request(e.to_string()))?,
            ));
        }
        Context::from_pairs(pairs).map_err(|e| PolicyError::Request(e.to_string()))
    }
}

/// Request contexts of the current second: requests that agree on every context value (the
/// same task asking again within the second, typically) share one evaluated `Context`.
#[derive(Default)]
struct Contexts {
    current: std::sync::Mutex<CurrentContexts>,
    hasher: std::hash::RandomState,
}

/// The second the contexts are of, and the contexts by a hash of their values.
type CurrentContexts = (
    i64,
    std::collections::HashMap<u64, (RequestContext, Context)>,
);

/// Most contexts kept for one second; past this, contexts are built without being kept.
const CONTEXT_CACHE: usize = 4096;

impl Contexts {
    fn get(
        &self,
        ctx: &RequestContext,
        build: impl FnOnce(&RequestContext) -> Result<Context, PolicyError>,
    ) -> Result<Context, PolicyError> {
        use std::hash::{BuildHasher, Hash, Hasher};
        let second = crate::clock::unix_secs(ctx.now);
        let mut h = self.hasher.build_hasher();
        ctx.requested_ttl_secs.hash(&mut h);
        ctx.evidence_age_secs.hash(&mut h);
        ctx.source_ip.hash(&mut h);
        if let Some(t) = &ctx.task {
            (&t.id, &t.labels, &t.scopes, t.age_secs).hash(&mut h);
        }
        ctx.behaviour.hash(&mut h);
        let key = h.finish();
        let same = |c: &RequestContext| {
            c.requested_ttl_secs == ctx.requested_ttl_secs
                && c.evidence_age_secs == ctx.evidence_age_secs
                && c.source_ip == ctx.source_ip
                && c.task == ctx.task
                && c.behaviour == ctx.behaviour
        };
        if let Some((_, context)) = self
            .lock()
            .1
            .get(&key)
            .filter(|(c, _)| crate::clock::unix_secs(c.now) == second && same(c))
        {
            return Ok(context.clone());
        }
        let context = build(ctx)?;
        let mut current = self.lock();
        if second > current.0 {
            current.0 = second;
            current.1.clear();
        }
        if current.0 == second && current.1.len() < CONTEXT_CACHE {
            current.1.insert(key, (ctx.clone(), context.clone()));
        }
        Ok(context)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CurrentContexts> {
        self.current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A principal as Cedar sees it: its uid and the entities to decide with (the principal alone;
/// resources are entities with no attributes, so they need no entry).
struct PrincipalEntities {
    uid: EntityUid,
    entities: Entities,
}

/// What a cached principal was built from, compared in full on every hit.
struct PrincipalSource {
    spiffe_id: String,
    attestor: String,
    claims: Map<String, Value>,
    built: Arc<PrincipalEntities>,
}

/// Principals' entities by what they were built from: a workload asking again and again (the
/// common case) is turned into Cedar values once, not on every request.
#[derive(Default)]
struct Principals {
    built: std::sync::Mutex<std::collections::HashMap<u64, PrincipalSource>>,
    hasher: std::hash::RandomState,
}

/// Most principals kept; the cache is cleared when it fills.
const PRINCIPAL_CACHE: usize = 4096;

impl Principals {
    fn get(
        &self,
        p: &Principal<'_>,
        workload: &EntityTypeName,
    ) -> Result<Arc<PrincipalEntities>, PolicyError> {
        use std::hash::{BuildHasher, Hash, Hasher};
        let mut h = self.hasher.build_hasher();
        p.spiffe_id.as_str().hash(&mut h);
        p.attestor.hash(&mut h);
        hash_claims(p.claims, &mut h);
        let key = h.finish();
        let lock = || {
            self.built
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        if let Some(c) = lock().get(&key).filter(|c| {
            c.spiffe_id == p.spiffe_id.as_str() && c.attestor == p.attestor && c.claims == *p.claims
        }) {
            return Ok(c.built.clone());
        }
        let built = Arc::new(build_principal(p, workload)?);
        let mut cache = lock();
        if cache.len() >= PRINCIPAL_CACHE {
            cache.clear();
        }
        cache.insert(
            key,
            PrincipalSource {
                spiffe_id: p.spiffe_id.as_str().to_owned(),
                attestor: p.attestor.to_owned(),
                claims: p.claims.clone(),
                built: built.clone(),
            },
        );
        Ok(built)
    }
}

/// Feeds claims to a hasher: keys, and values with their kind.
fn hash_claims(claims: &Map<String, Value>, h: &mut impl std::hash::Hasher) {
    use std::hash::Hash;
    fn value(v: &Value, h: &mut impl std::hash::Hasher) {
        match v {
            Value::Null => 0u8.hash(h),
            Value::Bool(b) => (1u8, b).hash(h),
            Value::Number(n) => (2u8, n.to_string()).hash(h),
            Value::String(s) => (3u8, s).hash(h),
            Value::Array(a) => {
                (4u8, a.len()).hash(h);
                a.iter().for_each(|v| value(v, h));
            }
            Value::Object(m) => {
                (5u8, m.len()).hash(h);
                hash_claims(m, h);
            }
        }
    }
    for (k, v) in claims {
        k.hash(h);
        value(v, h);
    }
}

/// The principal entity: its attributes, and its claims as tags.
fn build_principal(
    p: &Principal<'_>,
    workload: &EntityTypeName,
) -> Result<PrincipalEntities, PolicyError> {
    let uid =
        EntityUid::from_type_name_and_id(workload.clone(), EntityId::new(p.spiffe_id.as_str()));
    let entity = Entity::new_with_tags(
        uid.clone(),
        [
            (
                "spiffe_id".to_owned(),
                RestrictedExpression::new_string(p.spiffe_id.to_string()),
            ),
            (
                "attestor".to_owned(),
                RestrictedExpression::new_string(p.attestor.to_owned()),
            ),
            (
                "trust_domain".to_owned(),
                RestrictedExpression::new_string(p.spiffe_id.trust_domain().to_owned()),
            ),
            (
                "path".to_owned(),
                RestrictedExpression::new_string(p.spiffe_id.path().to_owned()),
            ),
        ],
        [],
        claim_tags(p.claims)?,
    )
    .map_err(|e| PolicyError::Request(e.to_string()))?;
    let entities =
        Entities::from_entities([entity], None).map_err(|e| PolicyError::Request(e.to_string()))?;
    Ok(PrincipalEntities { uid, entities })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine(
        files: &[(&str, &str)],
    ) -> (tempfile::TempDir, Result<PolicyEngine, Vec<PolicyProblem>>) {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let e = PolicyEngine::load(dir.path());
        (dir, e)
    }

    fn ctx(ttl: u64, ip: Option<&str>) -> RequestContext {
        RequestContext {
            source_ip: ip.map(|i| i.parse().unwrap()),
            requested_ttl_secs: ttl,
            evidence_age_secs: 5,
            now: SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_780_000_000), // 2026-05-28
            task: None,
            behaviour: None,
        }
    }

    const CI_POLICY: &str = r#"
@id("ci-deploy")
permit (principal, action == Ephemera::Action::"MintJwtSvid", resource == Ephemera::Audience::"deploy")
when {
  principal.attestor == "oidc" &&
  principal.hasTag("ref") && principal.getTag("ref") == "refs/heads/main" &&
  principal.hasTag("kubernetes.io.namespace") == false &&
  context.requested_ttl_secs <= 900 &&
  context has source_ip && context.source_ip.isInRange(ip("10.0.0.0/8"))
};

@id("change-freeze")
forbid (principal, action, resource)
when { context.now.toDate() == datetime("2026-09-21T00:00:00Z") };
"#;

    #[test]
    fn decisions_name_their_policies() {
        let (_d, e) = engine(&[("ci.cedar", CI_POLICY)]);
        let e = e.unwrap();
        let id: SpiffeId = "spiffe://example.org/ci/app".parse().unwrap();
        let claims = serde_json::json!({"ref": "refs/heads/main", "run_id": 42})
            .as_object()
            .unwrap()
            .clone();
        let p = Principal {
            spiffe_id: &id,
            attestor: "oidc",
            claims: &claims,
        };
        let aud = Resource::Audience("deploy".into());
        let ok = e
            .decide(&p, Action::MintJwtSvid, &aud, &ctx(600, Some("10.1.2.3")))
            .unwrap();
        assert!(ok.allowed, "{ok:?}");
        assert_eq!(ok.policies, ["ci-deploy"]);

        let rows = [
            (
                "ttl above the cap",
                ctx(901, Some("10.1.2.3")),
                Action::MintJwtSvid,
                aud.clone(),
            ),
            (
                "source outside the range",
                ctx(600, Some("192.168.1.1")),
                Action::MintJwtSvid,
                aud.clone(),
            ),
            (
                "no source (unix socket)",
                ctx(600, None),
                Action::MintJwtSvid,
                aud.clone(),
            ),
            (
                "other audience",
                ctx(600, Some("10.1.2.3")),
                Action::MintJwtSvid,
                Resource::Audience("x".into()),
            ),
            (
                "other action",
                ctx(600, Some("10.1.2.3")),
                Action::MintX509Svid,
                Resource::Target("x509-svid".into()),
            ),
        ];
        for (what, c, action, res) in rows {
            let d = e.decide(&p, action, &res, &c).unwrap();
            assert!(!d.allowed, "{what}");
            assert_eq!(d.deny_reason(), "no policy permits", "{what}");
        }
        let mut frozen = ctx(600, Some("10.1.2.3"));
        frozen.now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_790_000_000); // 2026-09-21
        let d = e.decide(&p, Action::MintJwtSvid, &aud, &frozen).unwrap();
        assert!(!d.allowed, "outside the time window");
        assert_eq!(d.policies, ["change-freeze"]);
        assert_eq!(d.deny_reason(), "forbidden by change-freeze");
    }

    #[test]
    fn empty_directory_denies_everything() {
        let (_d, e) = engine(&[]);
        let e = e.unwrap();
        assert_eq!(e.count(), 0);
        let id: SpiffeId = "spiffe://example.org/x".parse().unwrap();
        let claims = Map::new();
        let d = e
            .decide(
                &Principal {
                    spiffe_id: &id,
                    attestor: "unix",
                    claims: &claims,
                },
                Action::MintX509Svid,
                &Resource::Target("x509-svid".into()),
                &ctx(60, None),
            )
            .unwrap();
        assert!(!d.allowed);
    }

    #[test]
    fn problems_name_file_and_line() {
        let (d, e) = engine(&[
            (
                "a.cedar",
                "@id(\"ok\")\npermit (principal, action, resource);\n",
            ),
            (
                "b.cedar",
                "\n\npermit (principal, action, resource) when { principal.nope == 1 };\n",
            ),
            ("c.cedar", "permit (principal, action, resource)\n"),
        ]);
        let problems = e.err().unwrap();
        let shown: Vec<String> = problems.iter().map(ToString::to_string).collect();
        // Parse errors are reported first (validation runs only on parsable sets).
        assert!(
            problems
                .iter()
                .any(|p| p.file == d.path().join("c.cedar") && p.line.is_some()),
            "{shown:#?}"
        );
        std::fs::remove_file(d.path().join("c.cedar")).unwrap();
        let problems = PolicyEngine::load(d.path()).err().unwrap();
        let p = &problems[0];
        assert_eq!(p.file, d.path().join("b.cedar"), "{problems:?}");
        assert_eq!(p.line, Some(3), "{problems:?}");
        assert!(p.message.contains("nope"), "{}", p.message);
    }

    #[test]
    fn duplicate_ids_are_refused() {
        let (_d, e) = engine(&[
            (
                "a.cedar",
                "@id(\"same\")\npermit (principal, action, resource);\n",
            ),
            (
                "b.cedar",
                "@id(\"same\")\npermit (principal, action, resource);\n",
            ),
        ]);
        let problems = e.err().unwrap();
        assert!(
            problems[0].message.contains("duplicate policy id"),
            "{problems:?}"
        );
    }

    #[test]
    fn failed_reload_keeps_previous_policies() {
        let (d, e) = engine(&[(
            "a.cedar",
            "@id(\"all\")\npermit (principal, action, resource);\n",
        )]);
        let e = e.unwrap();
        std::fs::write(d.path().join("a.cedar"), "permit (principal, action").unwrap();
        assert!(e.reload_if_changed().unwrap().is_err());
        assert_eq!(e.count(), 1, "old policy still serving");
        assert!(
            e.reload_if_changed().is_none(),
            "a broken file is not re-parsed every poll"
        );
        std::fs::write(d.path().join("a.cedar"), "").unwrap();
        assert_eq!(e.reload_if_changed().unwrap(), Ok(0));
    }

    #[test]
    fn too_many_claims_are_refused() {
        let mut claims = Map::new();
        for i in 0..=MAX_CLAIM_TAGS {
            claims.insert(format!("c{i}"), Value::from(i));
        }
        assert!(matches!(claim_tags(&claims), Err(PolicyError::Request(_))));
    }

    /// Requests are not validated per decision; every shape `decide` builds must conform.
    #[test]
    fn requests_conform_to_the_schema() {
        let (_d, e) = engine(&[("ci.cedar", CI_POLICY)]);
        let e = e.unwrap();
        let uid = EntityUid::from_type_name_and_id(
            e.names.workload.clone(),
            EntityId::new("spiffe://example.org/ci/app"),
        );
        let task = TaskContext {
            id: "t-1".into(),
            labels: vec!["env=prod".into()],
            scopes: vec!["deploy:staging".into()],
            age_secs: 3,
        };
        for (action, resource) in [
            (Action::BeginTask, Resource::Target("task".into())),
            (Action::MintX509Svid, Resource::Target("x509-svid".into())),
            (Action::MintJwtSvid, Resource::Audience("deploy".into())),
        ] {
            for ip in [None, Some("10.1.2.3"), Some("::1")] {
                for task in [None, Some(task.clone())] {
                    for behaviour in [None, Some(BehaviourContext::default())] {
                        let ctx = RequestContext {
                            task: task.clone(),
                            behaviour,
                            ..ctx(60, ip)
                        };
                        e.request(&uid, action, &resource, &ctx, Some(&e.schema))
                            .unwrap_or_else(|err| panic!("{action:?} {ctx:?}: {err}"));
                    }
                }
            }
        }
        // And the check is real: a context of the wrong shape is refused.
        let wrong = Request::new(
            uid,
            e.names.action(Action::MintJwtSvid),
            e.names.resource(&Resource::Audience("deploy".into())),
            Context::from_pairs([("now".to_owned(), RestrictedExpression::new_long(1))]).unwrap(),
            Some(&e.schema),
        );
        assert!(wrong.is_err());
    }

    /// A principal asking again is served from the cache, and different claims are not.
    #[test]
    fn principals_are_built_once_per_distinct_claims() {
        let (_d, e) = engine(&[("ci.cedar", CI_POLICY)]);
        let e = e.unwrap();
        let id: SpiffeId = "spiffe://example.org/ci/app".parse().unwrap();
        let main = serde_json::json!({"ref": "refs/heads/main", "run": {"id": 42}})
            .as_object()
            .unwrap()
            .clone();
        let mut other = main.clone();
        other.insert("ref".into(), Value::from("refs/heads/dev"));
        let p = |claims| Principal {
            spiffe_id: &id,
            attestor: "oidc",
            claims,
        };
        let a = e.principals.get(&p(&main), &e.names.workload).unwrap();
        let b = e.principals.get(&p(&main), &e.names.workload).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        let c = e.principals.get(&p(&other), &e.names.workload).unwrap();
        assert!(!Arc::ptr_eq(&a, &c));
        // Decisions follow the claims, cached or not.
        let aud = Resource::Audience("deploy".into());
        let ctx = ctx(300, Some("10.1.2.3"));
        for _ in 0..2 {
            let allowed = |claims| {
                e.decide(&p(claims), Action::MintJwtSvid, &aud, &ctx)
                    .unwrap()
                    .allowed
            };
            assert!(allowed(&main));
            assert!(!allowed(&other));
        }
    }
}
