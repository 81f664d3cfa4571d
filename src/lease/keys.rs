//! The signing keys over time, kept in the store: which key signs now, which are published,
//! and when each moves on (the schedule of [`crate::ca::lifecycle`]).
//!
//! Every signing key (an X.509 intermediate, a JWT key) and every root is a [`StoredKey`], so
//! every replica publishes and signs with the same keys. Private keys are stored only wrapped
//! with AES-256-GCM under the key-encryption key in the data directory (`key-wrap.key`, shared
//! by replicas like the other secret files), bound to the key's id. Keys change only through
//! [`Store::change_keys`], a compare-and-swap on the keys' sequence number: replicas racing to
//! make the same change make it once, and the loser reads the winner's keys.
//!
//! Where the next intermediate comes from: with the root key online (`[ca] root_key =
//! "online"`, the dev default) the broker signs it itself; with the root offline it prepares a
//! key and a CSR (a `pending` key), and an operator signs the CSR on the root's machine
//! (`ephemera ca sign-intermediate`) and stages the certificate (`ephemera ca stage`).
//!
//! Roots roll over the same way: a new root is prepared (published in every bundle, nothing
//! chains to it) — by the broker at half the online root's life, or staged by an operator
//! (`ephemera ca new-root`, `ephemera ca stage`) — and becomes active, the root the next
//! intermediates chain to, once relying parties refreshing on the hint have it. The old root
//! stays in the bundles until no published intermediate chains to it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use rcgen::KeyPair;
use tokio::sync::watch;

use crate::ca::jwt::{EcPublicJwk, JwtSigner, JwtVerifier};
use crate::ca::keys::{self, CaError};
use crate::ca::lifecycle::{CaSettings, Kek, NewKey, RootSigner, at, secs};
use crate::ca::x509::X509Minter;
use crate::ca::{MintError, bundle, lifecycle};
use crate::clock::{Clock, unix_secs};
use crate::id::TrustDomain;
use crate::secret::Secret;
use crate::store::{KeyKind, KeyOp, KeyState, Store, StoreError, StoredKey};

/// When a key of this validity gets a successor (half its life) and hands over to it (a sixth
/// of its life before its end).
pub fn milestones(k: &StoredKey) -> (i64, i64) {
    let life = (k.not_after - k.not_before).max(0);
    (k.not_before + life / 2, k.not_after - life / 6)
}

/// The keys in force at one sequence number: what signs, and what relying parties are given.
pub struct KeySet {
    /// The keys' sequence number (`spiffe_sequence`).
    pub sequence: u64,
    /// The active intermediate, and its id.
    pub x509: Option<(String, Arc<X509Minter>)>,
    /// The active JWT key, its id and its `not_after`.
    pub jwt: Option<(String, Arc<JwtSigner>, SystemTime)>,
    /// Every published intermediate that can sign a CRL (active first), by id.
    pub crl_signers: Vec<(String, Arc<X509Minter>)>,
    /// Every published JWT key.
    pub jwt_keys: Vec<JwtVerifier>,
    /// The trust anchors (DER).
    pub roots: Vec<Vec<u8>>,
    /// The SPIFFE bundle.
    pub bundle_json: String,
    /// The JWKS.
    pub jwks_json: String,
    /// `spiffe_refresh_hint`, seconds.
    pub refresh_hint: u64,
    /// Every stored key (without its wrapped private key), for `ca status`.
    pub keys: Vec<StoredKey>,
    /// Keys this broker cannot use (it cannot unwrap them): shown by `/readyz`.
    pub problems: Vec<String>,
}

impl KeySet {
    /// The active intermediate, or `CaExpired` when there is none to sign with.
    pub fn x509(&self) -> Result<(&str, &X509Minter), MintError> {
        self.x509
            .as_ref()
            .map(|(id, m)| (id.as_str(), m.as_ref()))
            .ok_or(MintError::CaExpired)
    }

    /// The active JWT key, or `CaExpired` when there is none to sign with.
    pub fn jwt(&self) -> Result<(&str, &JwtSigner, SystemTime), MintError> {
        self.jwt
            .as_ref()
            .map(|(id, s, end)| (id.as_str(), s.as_ref(), *end))
            .ok_or(MintError::CaExpired)
    }

    /// Verifies a JWT signed by any published JWT key; its claims, or `None`.
    pub fn verify_jwt(&self, token: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
        self.jwt_keys.iter().find_map(|v| v.verify(token))
    }

    /// The active intermediate's `notAfter` (the Unix epoch when there is none).
    pub fn x509_not_after(&self) -> SystemTime {
        self.x509
            .as_ref()
            .map_or(SystemTime::UNIX_EPOCH, |(_, m)| m.ca_not_after())
    }
}

/// Why a key operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// No key has this id.
    #[error("no signing key {0:?}; `ephemera ca status` lists them")]
    NotFound(String),
    /// The request is not valid (a staged certificate that does not fit).
    #[error("{0}")]
    Invalid(String),
    /// The keys are not in a state that allows it.
    #[error("{0}")]
    Precondition(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Generating or reading key material failed.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// Other replicas kept changing the keys.
    #[error("the signing keys kept changing under this request; try again")]
    Busy,
}

/// The certificate authority: the key set in force, the schedule that moves it, and the
/// operations an admin forces.
pub struct KeyRing {
    trust_domain: TrustDomain,
    public_url: String,
    issuer: Option<String>,
    settings: CaSettings,
    kek: Kek,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    current: watch::Sender<Arc<KeySet>>,
    /// Parsed keys by id, so a new key set re-parses only new keys.
    minters: Mutex<HashMap<String, Arc<X509Minter>>>,
    signers: Mutex<HashMap<String, Arc<JwtSigner>>>,
    roots: Mutex<HashMap<String, Arc<RootSigner>>>,
    /// When the last "no successor staged" warning was logged.
    warned_at: Mutex<Option<i64>>,
    /// One change at a time from this process.
    changing: tokio::sync::Mutex<()>,
}

/// Where [`KeyRing::open`] finds its files and names its outputs.
pub struct CaOptions<'a> {
    /// The data directory (CA files, `key-wrap.key`).
    pub data_dir: &'a Path,
    /// The trust domain.
    pub trust_domain: &'a TrustDomain,
    /// The broker's HTTP base URL: CRL distribution points and, by default, the JWT `iss`.
    pub public_url: &'a str,
    /// The JWT `iss`, if not the public URL.
    pub jwt_issuer: Option<String>,
    /// The schedule.
    pub settings: CaSettings,
}

impl KeyRing {
    /// Opens the CA: checks the data directory's files, brings its root, intermediate and JWT
    /// key into the store the first time (as the active keys), applies any schedule step that
    /// is due, and builds the key set.
    pub async fn open(
        o: CaOptions<'_>,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, KeyError> {
        let dir = crate::datadir::DataDir::new(o.data_dir);
        let material = keys::load(o.data_dir, o.trust_domain)?;
        let kek = Kek::load_or_create(&dir.key_wrap())?;
        // The online root's key, to store wrapped: required unless a replica already did.
        let root_key = if o.settings.root_online {
            match lifecycle::read_root(&dir) {
                Ok((_, key)) => Some(key),
                Err(e) => {
                    let (_, stored) = store.signing_keys().await?;
                    let held = stored.iter().any(|k| {
                        k.kind == KeyKind::Root
                            && k.state == KeyState::Active
                            && k.wrapped.is_some()
                    });
                    if !held {
                        return Err(e.into());
                    }
                    None
                }
            }
        } else {
            None
        };
        let empty = KeySet {
            sequence: 0,
            x509: None,
            jwt: None,
            crl_signers: Vec::new(),
            jwt_keys: Vec::new(),
            roots: Vec::new(),
            bundle_json: String::new(),
            jwks_json: String::new(),
            refresh_hint: 0,
            keys: Vec::new(),
            problems: Vec::new(),
        };
        let ca = Self {
            trust_domain: o.trust_domain.clone(),
            public_url: o.public_url.to_owned(),
            issuer: Some(
                o.jwt_issuer
                    .clone()
                    .unwrap_or_else(|| o.public_url.to_owned()),
            ),
            settings: o.settings,
            kek,
            store,
            clock,
            current: watch::channel(Arc::new(empty)).0,
            minters: Mutex::default(),
            signers: Mutex::default(),
            roots: Mutex::default(),
            warned_at: Mutex::default(),
            changing: tokio::sync::Mutex::new(()),
        };
        ca.import(&material, root_key).await?;
        ca.tick().await?;
        Ok(ca)
    }

    /// The key set in force.
    pub fn keys(&self) -> Arc<KeySet> {
        self.current.borrow().clone()
    }

    /// Notified with every new key set.
    pub fn subscribe(&self) -> watch::Receiver<Arc<KeySet>> {
        self.current.subscribe()
    }

    /// The JWT `iss`.
    pub fn issuer(&self) -> Option<&str> {
        self.issuer.as_deref()
    }

    /// The schedule.
    pub fn settings(&self) -> CaSettings {
        self.settings
    }

    /// Whether the root key is held by the broker.
    pub fn root_online(&self) -> bool {
        self.settings.root_online
    }

    /// Brings the data directory's keys into the store: each one not there yet, as the active
    /// key of its kind when the store has none. With the root online, the root's key is stored
    /// wrapped (also for a root imported before without it).
    async fn import(
        &self,
        m: &keys::CaMaterial,
        root_key: Option<Secret<Vec<u8>>>,
    ) -> Result<(), KeyError> {
        let now = self.clock.unix_now();
        let root_wrapped = root_key
            .map(|k| self.wrap_cert_key(&m.root_der, k.expose()))
            .transpose()?;
        let root = cert_key(KeyKind::Root, &m.root_der, root_wrapped, now)?;
        let x509 = cert_key(
            KeyKind::X509,
            &m.intermediate_der,
            Some(self.wrap_cert_key(&m.intermediate_der, &m.intermediate_key.serialize_der())?),
            now,
        )?;
        let signer = JwtSigner::from_pkcs8(m.jwt_pkcs8.expose(), None)
            .map_err(|e| CaError::Generate(e.to_string()))?;
        let verifier = signer.verifier();
        let jwt_id = verifier.kid().to_owned();
        let jwt = StoredKey {
            wrapped: Some(self.kek.wrap(&jwt_id, m.jwt_pkcs8.expose())?),
            public: verifier.point().to_vec(),
            id: jwt_id,
            kind: KeyKind::Jwt,
            state: KeyState::Active,
            not_before: now,
            not_after: now + secs(self.settings.jwt_key_ttl),
            activate_at: now,
            created_at: now,
            changed_at: now,
            note: Some("imported".into()),
        };
        self.change(|keys| {
            let mut ops = Vec::new();
            if let Some(stored) = keys.iter().find(|s| s.id == root.id)
                && stored.wrapped.is_none()
                && root.wrapped.is_some()
            {
                let mut with_key = stored.clone();
                with_key.wrapped.clone_from(&root.wrapped);
                ops.push(KeyOp::Put(with_key));
            }
            for k in [&root, &x509, &jwt] {
                let known = keys.iter().any(|s| s.id == k.id);
                let has_active = keys
                    .iter()
                    .any(|s| s.kind == k.kind && s.state == KeyState::Active);
                if !known && !has_active {
                    ops.push(KeyOp::Put(k.clone()));
                }
            }
            Ok(ops)
        })
        .await?;
        Ok(())
    }

    fn wrap_cert_key(&self, cert_der: &[u8], pkcs8: &[u8]) -> Result<Vec<u8>, CaError> {
        let id = cert_id(cert_der)?;
        self.kek.wrap(&id, pkcs8)
    }

    /// Applies `plan` to the stored keys: reads them, asks `plan` for the changes, and writes
    /// them if no one else changed the keys meanwhile (else reads again). Then rebuilds the
    /// key set if the keys changed. Returns whether this call changed them.
    async fn change(
        &self,
        mut plan: impl FnMut(&[StoredKey]) -> Result<Vec<KeyOp>, KeyError>,
    ) -> Result<bool, KeyError> {
        let _one = self.changing.lock().await;
        for _ in 0..5 {
            let (seq, keys) = self.store.signing_keys().await?;
            let ops = plan(&keys)?;
            if ops.is_empty() {
                self.rebuild(seq, keys);
                return Ok(false);
            }
            if self.store.change_keys(seq, ops).await?.is_some() {
                let (seq, keys) = self.store.signing_keys().await?;
                self.rebuild(seq, keys);
                return Ok(true);
            }
        }
        Err(KeyError::Busy)
    }

    /// Reads the keys again and rebuilds the key set if they changed.
    pub async fn refresh(&self) -> Result<(), KeyError> {
        let (seq, keys) = self.store.signing_keys().await?;
        self.rebuild(seq, keys);
        Ok(())
    }

    /// One step of the schedule at the clock's time: activates successors that are due,
    /// prepares successors at half life, forgets keys whose credentials have all expired, and
    /// warns daily while an offline root has not signed a needed successor.
    pub async fn tick(&self) -> Result<bool, KeyError> {
        let now = self.clock.unix_now();
        let changed = self.change(|keys| self.plan(keys, now)).await?;
        self.warn_unstaged(now);
        Ok(changed)
    }

    /// The schedule's changes due at `now`.
    fn plan(&self, keys: &[StoredKey], now: i64) -> Result<Vec<KeyOp>, KeyError> {
        let mut ops = Vec::new();
        for kind in [KeyKind::Root, KeyKind::X509, KeyKind::Jwt] {
            let active = find(keys, kind, KeyState::Active);
            let prepared = find(keys, kind, KeyState::Prepared);
            let pending = find(keys, kind, KeyState::Pending);
            if let Some(p) = prepared {
                let active_over = active.is_none_or(|a| a.not_after <= now);
                if p.activate_at <= now || active_over {
                    ops.extend(activate(p, active, now));
                    continue;
                }
            }
            match active {
                Some(a) if a.not_after > now => {
                    let (prepare_at, hand_over) = milestones(a);
                    if now >= prepare_at
                        && prepared.is_none()
                        && pending.is_none()
                        && let Some(k) = self.generate(keys, kind, now, hand_over)?
                    {
                        ops.push(KeyOp::Put(k));
                    }
                }
                // Nothing can sign: make a key that signs now where the broker can (or, with
                // the root offline, the CSR for one).
                _ if prepared.is_none() && pending.is_none() => {
                    if let Some(mut k) = self.generate(keys, kind, now, now)? {
                        if k.state == KeyState::Prepared {
                            k.note = Some("replaced an expired key".into());
                            ops.extend(activate(&k, active, now));
                        } else {
                            ops.push(KeyOp::Put(k));
                        }
                    }
                }
                _ => {}
            }
        }
        // Retired and revoked keys are forgotten once nothing they signed can be valid, and a
        // retired root once no intermediate in the bundles (or signing a CRL) chains to it; an
        // active key past its end stays listed until something replaces it.
        let ended = |k: &StoredKey| {
            matches!(k.state, KeyState::Retired | KeyState::Revoked) && k.not_after <= now
        };
        for k in keys {
            let unused_root = k.kind == KeyKind::Root
                && k.state == KeyState::Retired
                && !keys.iter().any(|i| {
                    i.kind == KeyKind::X509
                        && i.state != KeyState::Pending
                        && !ended(i)
                        && lifecycle::signed_by(&i.public, &k.public)
                });
            if ended(k) || unused_root {
                ops.push(KeyOp::Delete(k.id.clone()));
            }
        }
        Ok(ops)
    }

    /// A new key of `kind` that becomes active at `activate_at`: a JWT key, an intermediate
    /// signed by the active online root, or (root offline) a pending intermediate awaiting its
    /// certificate, or a root (online only; `None` offline). `keys` are the stored keys.
    fn generate(
        &self,
        keys: &[StoredKey],
        kind: KeyKind,
        now: i64,
        activate_at: i64,
    ) -> Result<Option<StoredKey>, KeyError> {
        let new: NewKey = match kind {
            KeyKind::Jwt => lifecycle::new_jwt_key(now, self.settings.jwt_key_ttl)?,
            KeyKind::X509 => {
                let root = self.root_signer(keys);
                if self.settings.root_online && root.is_none() {
                    // Reported by `build` as a problem; nothing this broker can make.
                    return Ok(None);
                }
                lifecycle::new_intermediate(
                    &self.trust_domain,
                    root.as_deref(),
                    now,
                    self.settings.intermediate_ttl,
                )?
            }
            KeyKind::Root if self.settings.root_online => {
                lifecycle::new_root(&self.trust_domain, now, self.settings.root_ttl)?
            }
            KeyKind::Root => return Ok(None),
        };
        Ok(Some(StoredKey {
            wrapped: Some(self.kek.wrap(&new.id, new.pkcs8.expose())?),
            id: new.id,
            kind,
            state: if new.pending {
                KeyState::Pending
            } else {
                KeyState::Prepared
            },
            public: new.public,
            not_before: new.not_before,
            not_after: new.not_after,
            activate_at,
            created_at: now,
            changed_at: now,
            note: Some("scheduled".into()),
        }))
    }

    /// Logs, at most once a day, that the active intermediate needs a successor only an
    /// operator can give (the root is offline), and until when it covers.
    fn warn_unstaged(&self, now: i64) {
        let set = self.keys();
        let Some(pending) = set
            .keys
            .iter()
            .find(|k| k.kind == KeyKind::X509 && k.state == KeyState::Pending)
        else {
            return;
        };
        let mut warned = self
            .warned_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if warned.is_some_and(|w| now - w < 86_400) {
            return;
        }
        *warned = Some(now);
        let ends = unix_secs(set.x509_not_after());
        tracing::warn!(
            key = %pending.id,
            active_intermediate_ends_in_days = (ends - now) / 86_400,
            "the next intermediate CA is waiting for the offline root: sign its CSR with \
             `ephemera ca csr > next.csr`, `ephemera ca sign-intermediate` on the root's machine, \
             then `ephemera ca stage`; until then the active intermediate keeps signing until it ends"
        );
    }

    /// Builds the key set from the stored keys, unless it is already at `seq`.
    fn rebuild(&self, seq: u64, keys: Vec<StoredKey>) {
        if self.current.borrow().sequence == seq && seq != 0 {
            return;
        }
        let set = self.build(seq, keys);
        for p in &set.problems {
            tracing::error!(problem = %p, "a signing key cannot be used");
        }
        self.current.send_replace(Arc::new(set));
    }

    fn build(&self, sequence: u64, mut keys: Vec<StoredKey>) -> KeySet {
        let mut problems = Vec::new();
        let mut minters = self.minters.lock().unwrap_or_else(PoisonError::into_inner);
        let mut signers = self.signers.lock().unwrap_or_else(PoisonError::into_inner);
        let mut roots = Vec::new();
        let mut x509 = None;
        let mut jwt = None;
        let mut crl_signers = Vec::new();
        let mut jwt_keys = Vec::new();
        // Active keys first, then newest first.
        keys.sort_by_key(|k| (k.state != KeyState::Active, -k.created_at));
        for k in &keys {
            let crl_only = k.kind == KeyKind::X509 && k.state == KeyState::Revoked;
            if !k.state.published() && !crl_only {
                continue;
            }
            match k.kind {
                KeyKind::Root => roots.push(k.public.clone()),
                KeyKind::X509 if k.state != KeyState::Prepared => {
                    let minter = match minters.get(&k.id) {
                        Some(m) => Some(m.clone()),
                        None => match self.minter(k) {
                            Ok(m) => {
                                let m = Arc::new(m);
                                minters.insert(k.id.clone(), m.clone());
                                Some(m)
                            }
                            Err(e) => {
                                problems.push(format!("intermediate {}: {e}", k.id));
                                None
                            }
                        },
                    };
                    if let Some(m) = minter {
                        if k.state == KeyState::Active {
                            x509 = Some((k.id.clone(), m.clone()));
                        }
                        crl_signers.push((k.id.clone(), m));
                    }
                }
                KeyKind::X509 => {}
                KeyKind::Jwt => {
                    match JwtVerifier::new(&k.public) {
                        Some(v) => jwt_keys.push(v),
                        None => problems.push(format!("JWT key {}: not a P-256 key", k.id)),
                    }
                    if k.state == KeyState::Active {
                        let signer = match signers.get(&k.id) {
                            Some(s) => Some(s.clone()),
                            None => match self.signer(k) {
                                Ok(s) => {
                                    let s = Arc::new(s);
                                    signers.insert(k.id.clone(), s.clone());
                                    Some(s)
                                }
                                Err(e) => {
                                    problems.push(format!("JWT key {}: {e}", k.id));
                                    None
                                }
                            },
                        };
                        jwt = signer.map(|s| (k.id.clone(), s, at(k.not_after)));
                    }
                }
            }
        }
        let published: Vec<&str> = keys.iter().map(|k| k.id.as_str()).collect();
        minters.retain(|id, _| published.contains(&id.as_str()));
        signers.retain(|id, _| published.contains(&id.as_str()));
        let refresh_hint = self.settings.refresh_hint().as_secs();
        let bundle_json = bundle::spiffe_bundle(&roots, &jwt_keys, sequence, refresh_hint)
            .unwrap_or_else(|e| {
                problems.push(format!("bundle: {e}"));
                serde_json::json!({"keys": []})
            })
            .to_string();
        let jwks_json = bundle::jwks(&jwt_keys).to_string();
        if self.settings.root_online
            && let Some(r) = find(&keys, KeyKind::Root, KeyState::Active)
            && self.root_signer(&keys).is_none()
        {
            problems.push(format!(
                "root {}: [ca] root_key = \"online\" but this broker cannot use its private key \
                 (not stored, or wrapped under another key-wrap.key): it cannot sign the next \
                 intermediate",
                r.id
            ));
        }
        for k in &mut keys {
            k.wrapped = None;
        }
        KeySet {
            sequence,
            x509,
            jwt,
            crl_signers,
            jwt_keys,
            roots,
            bundle_json,
            jwks_json,
            refresh_hint,
            keys,
            problems,
        }
    }

    fn unwrap_key(&self, k: &StoredKey) -> Result<Secret<Vec<u8>>, String> {
        let wrapped = k.wrapped.as_deref().ok_or("no private key stored")?;
        self.kek.unwrap(&k.id, wrapped).ok_or_else(|| {
            "cannot unwrap its private key: this broker's key-wrap.key is not the one that \
             wrapped it (replicas must share the data directory's secret files)"
                .to_owned()
        })
    }

    fn minter(&self, k: &StoredKey) -> Result<X509Minter, String> {
        let pkcs8 = self.unwrap_key(k)?;
        let key = KeyPair::try_from(pkcs8.expose().as_slice()).map_err(|e| e.to_string())?;
        X509Minter::new(
            k.public.clone(),
            key,
            at(k.not_after),
            Some(format!("{}/crl/{}", self.public_url, k.id)),
        )
        .map_err(|e| e.to_string())
    }

    fn signer(&self, k: &StoredKey) -> Result<JwtSigner, String> {
        let pkcs8 = self.unwrap_key(k)?;
        JwtSigner::from_pkcs8(pkcs8.expose(), self.issuer.clone()).map_err(|e| e.to_string())
    }

    /// Why no intermediate can be made here.
    fn no_successor(&self, keys: &[StoredKey]) -> String {
        if self.settings.root_online && self.root_signer(keys).is_none() {
            "the active root's key cannot be used here (see `ephemera ca status`)".into()
        } else {
            "the root key is offline: stage the next intermediate first (`ephemera ca csr`, \
             `ephemera ca sign-intermediate`, `ephemera ca stage`)"
                .into()
        }
    }

    /// The active root of `keys`, when the broker holds the root key and can unwrap it.
    fn root_signer(&self, keys: &[StoredKey]) -> Option<Arc<RootSigner>> {
        if !self.settings.root_online {
            return None;
        }
        let k = find(keys, KeyKind::Root, KeyState::Active)?;
        let mut roots = self.roots.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(r) = roots.get(&k.id) {
            return Some(r.clone());
        }
        let pkcs8 = self.unwrap_key(k).ok()?;
        let signer = Arc::new(RootSigner::new(&k.public, pkcs8.expose()).ok()?);
        roots.retain(|id, _| keys.iter().any(|s| &s.id == id));
        roots.insert(k.id.clone(), signer.clone());
        Some(signer)
    }

    /// `ca rotate`: a new key of `kind` becomes active now (`immediately`) or once relying
    /// parties refreshing on the hint have it. A prepared successor is used if there is one.
    /// Returns the key that will sign. A new root (root online) is what the next
    /// intermediates chain to; the active intermediate is not replaced.
    pub async fn rotate(&self, kind: KeyKind, immediately: bool) -> Result<StoredKey, KeyError> {
        if kind == KeyKind::Root && !self.settings.root_online {
            return Err(KeyError::Precondition(
                "the root key is offline: make the new root on the root's machine \
                 (`ephemera ca new-root`) and stage its certificate (`ephemera ca stage`)"
                    .into(),
            ));
        }
        let now = self.clock.unix_now();
        let activate_at = if immediately {
            now
        } else {
            now + publish_ahead(&self.settings, kind)
        };
        let mut chosen = None;
        self.change(|keys| {
            let active = find(keys, kind, KeyState::Active);
            let mut next = match find(keys, kind, KeyState::Prepared) {
                Some(p) => p.clone(),
                None => match self.generate(keys, kind, now, activate_at)? {
                    Some(k) if k.state == KeyState::Prepared => k,
                    _ => return Err(KeyError::Precondition(self.no_successor(keys))),
                },
            };
            next.activate_at = activate_at.min(next.activate_at.max(now));
            if !immediately {
                // An intermediate under a staged root waits until the root is published long
                // enough.
                next.activate_at = next.activate_at.max(root_wait(keys, &next));
            }
            next.note = Some("forced".into());
            let ops = if next.activate_at <= now {
                activate(&next, active, now)
            } else {
                vec![KeyOp::Put(next)]
            };
            // The key as it is stored: the last put.
            chosen = ops.iter().rev().find_map(|op| match op {
                KeyOp::Put(k) => Some(k.clone()),
                KeyOp::Delete(_) => None,
            });
            Ok(ops)
        })
        .await?;
        chosen.ok_or(KeyError::Busy)
    }

    /// `ca revoke-key`: withdraws the key `id` from every bundle (a successor takes over first
    /// if it was the active key). The caller revokes every live credential it signed.
    pub async fn revoke_key(&self, id: &str, reason: &str) -> Result<StoredKey, KeyError> {
        let now = self.clock.unix_now();
        let mut revoked = None;
        self.change(|keys| {
            let key = keys
                .iter()
                .find(|k| k.id == id)
                .ok_or_else(|| KeyError::NotFound(id.to_owned()))?;
            if key.kind == KeyKind::Root {
                return Err(KeyError::Invalid(
                    "a root is not revoked by the broker: a compromised root needs a new trust domain CA".into(),
                ));
            }
            let mut ops = Vec::new();
            let mut gone = key.clone();
            revoked = Some(gone.clone());
            if key.state == KeyState::Revoked {
                return Ok(ops);
            }
            if key.state == KeyState::Active {
                let next = match find(keys, key.kind, KeyState::Prepared) {
                    Some(p) => p.clone(),
                    None => match self.generate(keys, key.kind, now, now)? {
                        Some(k) if k.state == KeyState::Prepared => k,
                        _ => {
                            return Err(KeyError::Precondition(format!(
                                "{id} is the active intermediate: {}, then revoke it",
                                self.no_successor(keys)
                            )));
                        }
                    },
                };
                ops.extend(activate(&next, None, now));
            }
            gone.state = KeyState::Revoked;
            gone.changed_at = now;
            // A revoked intermediate keeps signing its own CRL (the distribution point of what
            // it signed) until its end; a revoked JWT key is no longer needed at all.
            if gone.kind == KeyKind::Jwt {
                gone.wrapped = None;
            }
            gone.note = Some(reason.to_owned());
            revoked = Some(gone.clone());
            ops.push(KeyOp::Put(gone));
            Ok(ops)
        })
        .await?;
        revoked.ok_or(KeyError::Busy)
    }

    /// The pending intermediate's CSR (PEM), for the offline root to sign.
    pub fn pending_csr(&self) -> Result<(String, String), KeyError> {
        let set = self.keys();
        let k = set
            .keys
            .iter()
            .find(|k| k.kind == KeyKind::X509 && k.state == KeyState::Pending)
            .ok_or_else(|| {
                KeyError::Precondition(
                    "no intermediate is waiting for the root: one is prepared at half the \
                     active intermediate's life (or now, with `ephemera ca rotate --x509`)"
                        .into(),
                )
            })?;
        Ok((
            k.id.clone(),
            pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", k.public.clone())),
        ))
    }

    /// Prepares a pending intermediate for an offline root: a CSR waits for the operator.
    pub async fn request_intermediate(&self) -> Result<StoredKey, KeyError> {
        let now = self.clock.unix_now();
        let mut out = None;
        self.change(|keys| {
            if let Some(p) = find(keys, KeyKind::X509, KeyState::Pending) {
                out = Some(p.clone());
                return Ok(Vec::new());
            }
            let hand_over = find(keys, KeyKind::X509, KeyState::Active)
                .map_or(now, |a| milestones(a).1.max(now));
            let k = self
                .generate(keys, KeyKind::X509, now, hand_over)?
                .ok_or_else(|| KeyError::Precondition(self.no_successor(keys)))?;
            out = Some(k.clone());
            Ok(vec![KeyOp::Put(k)])
        })
        .await?;
        out.ok_or(KeyError::Busy)
    }

    /// `ca stage`: the offline root's certificate for the pending intermediate (a CA
    /// certificate for this trust domain, for the pending key, signed by a published root), or
    /// a new root (self-signed), published now and active once relying parties refreshing on
    /// the hint have it. An intermediate under a staged root does not sign before the root is
    /// active.
    pub async fn stage(&self, cert_der: &[u8]) -> Result<StoredKey, KeyError> {
        let now = self.clock.unix_now();
        let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
            .map_err(|e| KeyError::Invalid(format!("not an X.509 certificate: {e}")))?;
        let id = EcPublicJwk::from_uncompressed(&cert.public_key().subject_public_key.data)
            .map(|j| j.thumbprint())
            .ok_or_else(|| KeyError::Invalid("the certificate's key is not EC P-256".into()))?;
        if !cert.is_ca() {
            return Err(KeyError::Invalid("not a CA certificate".into()));
        }
        let not_before = cert.validity().not_before.timestamp();
        let not_after = cert.validity().not_after.timestamp();
        if not_after <= now {
            return Err(KeyError::Invalid("the certificate has expired".into()));
        }
        let td = keys::trust_domain_of(Path::new("the staged certificate"), cert_der)
            .map_err(|e| KeyError::Invalid(e.to_string()))?;
        if td != self.trust_domain {
            return Err(KeyError::Invalid(format!(
                "the certificate is for trust domain {td}, not {}",
                self.trust_domain
            )));
        }
        let self_signed = cert.subject() == cert.issuer() && cert.verify_signature(None).is_ok();
        let mut staged = None;
        self.change(|keys| {
            if self_signed {
                if keys.iter().any(|k| k.id == id) {
                    return Err(KeyError::Invalid(format!(
                        "the root {id} is already in the bundle"
                    )));
                }
                let root = StoredKey {
                    id: id.clone(),
                    kind: KeyKind::Root,
                    state: KeyState::Prepared,
                    public: cert_der.to_vec(),
                    wrapped: None,
                    not_before,
                    not_after,
                    activate_at: now + publish_ahead(&self.settings, KeyKind::Root),
                    created_at: now,
                    changed_at: now,
                    note: Some("staged".into()),
                };
                staged = Some(root.clone());
                return Ok(vec![KeyOp::Put(root)]);
            }
            let pending = keys
                .iter()
                .find(|k| k.id == id)
                .filter(|k| k.kind == KeyKind::X509 && k.state == KeyState::Pending)
                .ok_or_else(|| {
                    KeyError::Invalid(format!(
                        "the certificate is not for the pending intermediate's key ({}); sign \
                         the CSR from `ephemera ca csr`",
                        find(keys, KeyKind::X509, KeyState::Pending)
                            .map_or("none is pending", |p| p.id.as_str())
                    ))
                })?;
            let root = keys
                .iter()
                .filter(|k| k.kind == KeyKind::Root && k.state.published())
                .find(|r| lifecycle::signed_by(cert_der, &r.public))
                .ok_or_else(|| {
                    KeyError::Invalid(
                        "the certificate is not signed by a root in the bundle".into(),
                    )
                })?;
            let mut k = pending.clone();
            if root.state == KeyState::Prepared {
                k.activate_at = k.activate_at.max(root.activate_at);
            }
            k.state = KeyState::Prepared;
            k.public = cert_der.to_vec();
            k.not_before = not_before;
            k.not_after = not_after;
            k.changed_at = now;
            k.note = Some("staged".into());
            staged = Some(k.clone());
            Ok(vec![KeyOp::Put(k)])
        })
        .await?;
        let k = staged.ok_or(KeyError::Busy)?;
        self.tick().await?;
        Ok(k)
    }
}

/// How long before it signs a key forced in by `ca rotate` (without `--immediately`) is
/// published: two refresh hints, so a relying party refreshing on the hint has it.
fn publish_ahead(settings: &CaSettings, kind: KeyKind) -> i64 {
    match kind {
        // Relying parties trust the root: a new intermediate needs no publication.
        KeyKind::X509 => 0,
        KeyKind::Jwt | KeyKind::Root => secs(settings.refresh_hint() * 2),
    }
}

/// When the root that signed the intermediate `k` becomes active, if it is a prepared one
/// (else 0).
fn root_wait(keys: &[StoredKey], k: &StoredKey) -> i64 {
    if k.kind != KeyKind::X509 {
        return 0;
    }
    keys.iter()
        .filter(|r| r.kind == KeyKind::Root && r.state == KeyState::Prepared)
        .find(|r| lifecycle::signed_by(&k.public, &r.public))
        .map_or(0, |r| r.activate_at)
}

/// The key of `kind` in `state` (at most one is prepared, pending or active).
fn find(keys: &[StoredKey], kind: KeyKind, state: KeyState) -> Option<&StoredKey> {
    keys.iter().find(|k| k.kind == kind && k.state == state)
}

/// `next` becomes active now and `active` (if any) retires.
fn activate(next: &StoredKey, active: Option<&StoredKey>, now: i64) -> Vec<KeyOp> {
    let mut ops = Vec::new();
    if let Some(a) = active {
        let mut a = a.clone();
        a.state = KeyState::Retired;
        a.changed_at = now;
        ops.push(KeyOp::Put(a));
    }
    let mut n = next.clone();
    n.state = KeyState::Active;
    n.activate_at = n.activate_at.min(now);
    n.changed_at = now;
    ops.push(KeyOp::Put(n));
    ops
}

/// The id of a certificate's key (RFC 7638 thumbprint).
fn cert_id(der: &[u8]) -> Result<String, CaError> {
    bundle::certificate_jwk(der)
        .map(|j| j.thumbprint())
        .map_err(|e| CaError::Generate(e.to_string()))
}

/// A stored key for a certificate from the data directory, active now.
fn cert_key(
    kind: KeyKind,
    der: &[u8],
    wrapped: Option<Vec<u8>>,
    now: i64,
) -> Result<StoredKey, CaError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| CaError::Generate(e.to_string()))?;
    Ok(StoredKey {
        id: cert_id(der)?,
        kind,
        state: KeyState::Active,
        public: der.to_vec(),
        wrapped,
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        activate_at: now,
        created_at: now,
        changed_at: now,
        note: Some("imported".into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::lifecycle::sign_intermediate;
    use crate::clock::ManualClock;
    use crate::id::{Audience, SpiffeId};
    use crate::store::sqlite::SqliteStore;
    use rustls::pki_types::{CertificateDer, UnixTime};
    use std::time::Duration;

    const DAY: u64 = 86_400;

    fn td() -> TrustDomain {
        "example.org".parse().unwrap()
    }

    struct Fixture {
        dir: tempfile::TempDir,
        store: Arc<dyn Store>,
        clock: ManualClock,
    }

    impl Fixture {
        async fn new(intermediate_ttl: Duration) -> Self {
            Self::with_root(Duration::from_secs(20 * 365 * DAY), intermediate_ttl).await
        }

        async fn with_root(root_ttl: Duration, intermediate_ttl: Duration) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let start = SystemTime::now();
            keys::init(
                dir.path(),
                &td(),
                keys::InitOptions {
                    root_ttl,
                    intermediate_ttl,
                },
                start,
            )
            .unwrap();
            Self {
                dir,
                store: Arc::new(SqliteStore::in_memory().await.unwrap()),
                clock: ManualClock::new(start),
            }
        }

        async fn open(&self, settings: CaSettings) -> KeyRing {
            KeyRing::open(
                CaOptions {
                    data_dir: self.dir.path(),
                    trust_domain: &td(),
                    public_url: "https://broker.example.org",
                    jwt_issuer: None,
                    settings,
                },
                self.store.clone(),
                Arc::new(self.clock.clone()),
            )
            .await
            .unwrap()
        }

        fn advance(&self, secs: u64) {
            self.clock.advance(Duration::from_secs(secs));
        }

        fn now(&self) -> SystemTime {
            self.clock.now()
        }
    }

    /// What a relying party holds: the trust anchors and JWKS it fetched at its last refresh.
    struct RelyingParty {
        roots: Vec<Vec<u8>>,
        jwks: serde_json::Value,
        fetched: i64,
    }

    impl RelyingParty {
        fn fetch(set: &KeySet, now: i64) -> Self {
            Self {
                roots: set.roots.clone(),
                jwks: serde_json::from_str(&set.jwks_json).unwrap(),
                fetched: now,
            }
        }

        /// Verifies a leaf and its chain with rustls-webpki at `now`.
        fn verify_x509(&self, chain: &[Vec<u8>], now: SystemTime) -> Result<(), String> {
            let anchors: Vec<_> = self
                .roots
                .iter()
                .map(|r| {
                    webpki::anchor_from_trusted_cert(&CertificateDer::from(r.as_slice()))
                        .unwrap()
                        .to_owned()
                })
                .collect();
            let leaf = CertificateDer::from(chain[0].as_slice());
            let ee = webpki::EndEntityCert::try_from(&leaf).map_err(|e| e.to_string())?;
            let inter: Vec<_> = chain[1..]
                .iter()
                .map(|c| CertificateDer::from(c.as_slice()))
                .collect();
            ee.verify_for_usage(
                rustls::crypto::ring::default_provider()
                    .signature_verification_algorithms
                    .all,
                &anchors,
                &inter,
                UnixTime::since_unix_epoch(now.duration_since(SystemTime::UNIX_EPOCH).unwrap()),
                webpki::KeyUsage::client_auth(),
                None,
                None,
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
        }

        /// Verifies a JWT with ring against the JWKS key its `kid` names.
        fn verify_jwt(&self, token: &str) -> Result<(), String> {
            use base64::Engine;
            let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
            let (signed, sig) = token.rsplit_once('.').unwrap();
            let header: serde_json::Value =
                serde_json::from_slice(&b64.decode(signed.split('.').next().unwrap()).unwrap())
                    .unwrap();
            let key = self.jwks["keys"]
                .as_array()
                .unwrap()
                .iter()
                .find(|k| k["kid"] == header["kid"])
                .ok_or_else(|| format!("kid {} not in the JWKS", header["kid"]))?;
            let mut point = vec![4u8];
            for c in ["x", "y"] {
                point.extend(b64.decode(key[c].as_str().unwrap()).unwrap());
            }
            ring::signature::UnparsedPublicKey::new(
                &ring::signature::ECDSA_P256_SHA256_FIXED,
                point,
            )
            .verify(signed.as_bytes(), &b64.decode(sig).unwrap())
            .map_err(|_| "bad signature".to_owned())
        }
    }

    fn id() -> SpiffeId {
        "spiffe://example.org/svc".parse().unwrap()
    }

    /// Mints what a broker would for a `ttl` request: clamped to the key's end, which the test
    /// asserts never happens (credentials are never cut short by a rotation).
    fn mint(
        set: &KeySet,
        now: SystemTime,
        x509_ttl: u64,
        jwt_ttl: u64,
    ) -> (Vec<Vec<u8>>, String, i64) {
        let (_, minter) = set.x509().expect("an intermediate signs at every moment");
        let want = now + Duration::from_secs(x509_ttl);
        assert!(
            want <= minter.ca_not_after(),
            "an X.509-SVID would be cut short by its intermediate's end"
        );
        let svid = minter
            .mint(&id(), crate::ca::x509::SubjectKey::Generate, now, want)
            .unwrap();
        let (_, signer, key_end) = set.jwt().expect("a JWT key signs at every moment");
        let exp = unix_secs(now) + i64::try_from(jwt_ttl).unwrap();
        assert!(
            exp <= unix_secs(key_end),
            "a JWT-SVID would outlive its key"
        );
        let aud: Vec<Audience> = vec!["rp".parse().unwrap()];
        let token = signer
            .sign(&crate::ca::jwt::JwtSvidClaims {
                sub: id().as_str(),
                aud: &aud,
                exp,
                iat: unix_secs(now),
                jti: "j",
            })
            .unwrap();
        (svid.cert_chain, token, exp)
    }

    /// The keys a schedule went through.
    #[derive(Default)]
    struct Seen {
        x509: Vec<String>,
        jwt: Vec<String>,
        roots: Vec<String>,
    }

    /// Drives the schedule for `hours` on the manual clock: credentials are minted every hour
    /// and verified, at minting and again shortly before they expire, against the bundle a
    /// relying party fetched at its last refresh hint. The broker is restarted every 10 days.
    /// At most `max_keys` keys are kept at any time.
    async fn drive(f: &Fixture, settings: CaSettings, hours: u64, max_keys: usize) -> Seen {
        let mut ca = f.open(settings).await;
        let mut rp = RelyingParty::fetch(&ca.keys(), unix_secs(f.now()));
        let (x509_ttl, jwt_ttl) = (DAY, 5400);
        let mut live: Vec<(Vec<Vec<u8>>, String, i64, i64)> = Vec::new();
        let mut seen = Seen::default();
        let step = 3600;
        for hour in 0..hours {
            f.advance(step);
            let now = f.now();
            let unix = unix_secs(now);
            if hour % 240 == 239 {
                drop(ca);
                ca = f.open(settings).await;
            } else {
                ca.tick().await.unwrap();
            }
            let set = ca.keys();
            assert!(set.problems.is_empty(), "hour {hour}: {:?}", set.problems);
            if unix - rp.fetched >= i64::try_from(set.refresh_hint).unwrap() {
                rp = RelyingParty::fetch(&set, unix);
            }
            let (chain, token, exp) = mint(&set, now, x509_ttl, jwt_ttl);
            live.push((chain, token, exp, unix + i64::try_from(x509_ttl).unwrap()));
            // Everything still valid verifies: the X.509-SVIDs about to expire, every JWT.
            live.retain(|(_, _, jwt_exp, x509_end)| *jwt_exp > unix || *x509_end > unix);
            for (chain, token, jwt_exp, x509_end) in &live {
                if *x509_end > unix && *x509_end - unix <= i64::try_from(step).unwrap() * 2
                    || *x509_end - unix == i64::try_from(x509_ttl).unwrap()
                {
                    rp.verify_x509(chain, now)
                        .unwrap_or_else(|e| panic!("hour {hour}: X.509-SVID: {e}"));
                }
                if *jwt_exp > unix {
                    rp.verify_jwt(token)
                        .unwrap_or_else(|e| panic!("hour {hour}: JWT-SVID: {e}"));
                }
            }
            let (x, _) = set.x509().unwrap();
            if seen.x509.last().map(String::as_str) != Some(x) {
                seen.x509.push(x.to_owned());
            }
            let (j, _, _) = set.jwt().unwrap();
            if seen.jwt.last().map(String::as_str) != Some(j) {
                seen.jwt.push(j.to_owned());
            }
            let root = find(&set.keys, KeyKind::Root, KeyState::Active).unwrap();
            if seen.roots.last() != Some(&root.id) {
                seen.roots.push(root.id.clone());
            }
            // Nothing unbounded: the published keys are the active ones and their neighbours.
            assert!(
                set.keys.len() <= max_keys,
                "hour {hour}: {} keys kept",
                set.keys.len()
            );
        }
        seen
    }

    /// Fourteen months with 30-day intermediates and 7-day JWT keys under one root.
    #[tokio::test]
    async fn a_year_of_rotations_never_leaves_a_credential_unverifiable() {
        let f = Fixture::new(Duration::from_secs(30 * DAY)).await;
        let settings = CaSettings {
            intermediate_ttl: Duration::from_secs(30 * DAY),
            jwt_key_ttl: Duration::from_secs(7 * DAY),
            root_online: true,
            ..CaSettings::default()
        };
        assert_eq!(
            f.open(settings).await.keys().refresh_hint,
            3600,
            "a thirtieth of 7 days, capped at an hour"
        );
        let seen = drive(&f, settings, 425 * 24, 7).await;
        assert!(seen.x509.len() >= 16, "{} intermediates", seen.x509.len());
        assert!(seen.jwt.len() >= 70, "{} JWT keys", seen.jwt.len());
        assert_eq!(seen.roots.len(), 1);
    }

    /// Fourteen months with 120-day roots held by the broker: each new root is in the bundle
    /// relying parties fetch before an intermediate chains to it, and an old root leaves the
    /// bundle once no intermediate in it chains to it.
    #[tokio::test]
    async fn roots_roll_over_before_anything_chains_to_them() {
        let root_ttl = Duration::from_secs(120 * DAY);
        let f = Fixture::with_root(root_ttl, Duration::from_secs(20 * DAY)).await;
        let settings = CaSettings {
            root_ttl,
            intermediate_ttl: Duration::from_secs(20 * DAY),
            jwt_key_ttl: Duration::from_secs(7 * DAY),
            root_online: true,
        };
        let seen = drive(&f, settings, 425 * 24, 9).await;
        assert!(seen.roots.len() >= 4, "{} roots", seen.roots.len());
        assert!(seen.x509.len() >= 24, "{} intermediates", seen.x509.len());
        let ca = f.open(settings).await;
        let roots = ca.keys().roots.len();
        assert!(roots <= 2, "{roots} roots still published");
    }

    /// With the root offline, the broker prepares a key and a CSR at half the intermediate's
    /// life and warns; an intermediate signed on the root's machine is staged and takes over
    /// at the scheduled time. Without one, X.509 minting stops when the intermediate ends.
    #[tokio::test]
    async fn an_offline_root_signs_a_staged_intermediate() {
        let f = Fixture::new(Duration::from_secs(60 * DAY)).await;
        let settings = CaSettings {
            intermediate_ttl: Duration::from_secs(60 * DAY),
            jwt_key_ttl: Duration::from_secs(30 * DAY),
            root_online: false,
            ..CaSettings::default()
        };
        let ca = f.open(settings).await;
        let first = ca.keys().x509().unwrap().0.to_owned();
        assert!(
            ca.pending_csr().is_err(),
            "nothing pending before half life"
        );
        f.advance(31 * DAY);
        ca.tick().await.unwrap();
        let (pending, csr) = ca.pending_csr().unwrap();
        assert!(csr.starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
        assert_eq!(
            ca.keys().x509().unwrap().0,
            first,
            "the old one still signs"
        );

        // A certificate for another key, or from another root, is refused.
        let other = tempfile::tempdir().unwrap();
        keys::init(other.path(), &td(), keys::InitOptions::default(), f.now()).unwrap();
        let foreign =
            sign_intermediate(other.path(), &csr, Duration::from_secs(60 * DAY), f.now()).unwrap();
        let der = |pem_text: &str| pem::parse(pem_text).unwrap().into_contents();
        let err = ca.stage(&der(&foreign)).await.unwrap_err();
        assert!(
            err.to_string()
                .contains("not signed by a root in the bundle"),
            "{err}"
        );
        let wrong = std::fs::read_to_string(other.path().join(keys::INTERMEDIATE_CERT)).unwrap();
        let err = ca.stage(&der(&wrong)).await.unwrap_err();
        assert!(
            err.to_string().contains("not for the pending intermediate"),
            "{err}"
        );

        // Signed by our root (on "its machine": the data directory holds the root key here).
        let signed =
            sign_intermediate(f.dir.path(), &csr, Duration::from_secs(60 * DAY), f.now()).unwrap();
        let staged = ca.stage(&der(&signed)).await.unwrap();
        assert_eq!(staged.id, pending);
        assert_eq!(staged.state, KeyState::Prepared);
        assert!(ca.pending_csr().is_err());
        // It takes over a sixth of the old intermediate's life before its end.
        f.advance(18 * DAY);
        ca.tick().await.unwrap();
        assert_eq!(ca.keys().x509().unwrap().0, first);
        f.advance(DAY);
        ca.tick().await.unwrap();
        let set = ca.keys();
        assert_eq!(set.x509().unwrap().0, pending);
        let (chain, _, _) = mint(&set, f.now(), DAY, 600);
        RelyingParty::fetch(&set, 0)
            .verify_x509(&chain, f.now())
            .unwrap();
        // The retired one still signs its CRL; the CRL names the new one's.
        assert_eq!(set.crl_signers.len(), 2);

        // No successor staged this time: minting stops when the intermediate ends.
        f.advance(60 * DAY);
        ca.tick().await.unwrap();
        assert!(ca.pending_csr().is_ok());
        let set = ca.keys();
        assert!(set.x509_not_after() <= f.now());
        let (_, minter) = set.x509().unwrap();
        let minted = minter.mint(
            &id(),
            crate::ca::x509::SubjectKey::Generate,
            f.now(),
            f.now() + Duration::from_secs(60),
        );
        assert!(matches!(minted, Err(MintError::CaExpired)));
    }

    /// With the root offline, a new root made on the root's machine is staged: published at
    /// once, active two refresh hints later; an intermediate it signs waits for it, then takes
    /// over; the old root leaves the bundle once its last intermediate has ended.
    #[tokio::test]
    async fn an_offline_root_rolls_over_when_staged() {
        let f = Fixture::new(Duration::from_secs(60 * DAY)).await;
        let settings = CaSettings {
            intermediate_ttl: Duration::from_secs(60 * DAY),
            jwt_key_ttl: Duration::from_secs(30 * DAY),
            ..CaSettings::default()
        };
        let ca = f.open(settings).await;
        let hint = i64::try_from(ca.keys().refresh_hint).unwrap();
        let old_root = ca.keys().roots[0].clone();
        let first = ca.keys().x509().unwrap().0.to_owned();
        assert!(matches!(
            ca.rotate(KeyKind::Root, false).await,
            Err(KeyError::Precondition(_))
        ));

        // On the root's machine: a new root.
        let machine = tempfile::tempdir().unwrap();
        let root_pem = lifecycle::new_root_files(
            machine.path(),
            &td(),
            Duration::from_secs(10 * 365 * DAY),
            f.now(),
        )
        .unwrap();
        assert!(matches!(
            lifecycle::new_root_files(machine.path(), &td(), Duration::from_secs(DAY), f.now()),
            Err(CaError::AlreadyInitialized { .. })
        ));
        let der = |pem_text: &str| pem::parse(pem_text).unwrap().into_contents();
        let root = ca.stage(&der(&root_pem)).await.unwrap();
        assert_eq!((root.kind, root.state), (KeyKind::Root, KeyState::Prepared));
        assert_eq!(root.activate_at - unix_secs(f.now()), 2 * hint);
        assert_eq!(
            ca.keys().roots.len(),
            2,
            "published before anything chains to it"
        );
        let err = ca.stage(&der(&root_pem)).await.unwrap_err();
        assert!(err.to_string().contains("already in the bundle"), "{err}");

        // An intermediate signed by it waits for it, even when forced.
        let pending = ca.request_intermediate().await.unwrap();
        let (_, csr) = ca.pending_csr().unwrap();
        let signed =
            sign_intermediate(machine.path(), &csr, Duration::from_secs(60 * DAY), f.now())
                .unwrap();
        let staged = ca.stage(&der(&signed)).await.unwrap();
        assert_eq!(staged.id, pending.id);
        let forced = ca.rotate(KeyKind::X509, false).await.unwrap();
        assert_eq!(forced.activate_at, root.activate_at);
        assert_eq!(ca.keys().x509().unwrap().0, first);

        // Two hints later the root is active and the intermediate signs under it; the old
        // root stays while the old intermediate is published.
        f.advance(u64::try_from(2 * hint).unwrap());
        ca.tick().await.unwrap();
        let set = ca.keys();
        assert_eq!(set.x509().unwrap().0, pending.id);
        assert_eq!(
            find(&set.keys, KeyKind::Root, KeyState::Active).unwrap().id,
            root.id
        );
        assert_eq!(set.roots.len(), 2);
        let (chain, _, _) = mint(&set, f.now(), DAY, 600);
        let rp = RelyingParty::fetch(&set, 0);
        rp.verify_x509(&chain, f.now()).unwrap();
        assert!(lifecycle::signed_by(&chain[1], &der(&root_pem)));

        // After the old intermediate's end, the old root is gone from the bundle.
        f.advance(61 * DAY);
        ca.tick().await.unwrap();
        let set = ca.keys();
        assert_eq!(set.roots, vec![der(&root_pem)]);
        assert!(!set.roots.contains(&old_root));
    }

    /// `rotate` publishes a JWT key before it signs (unless `immediately`); `revoke_key` puts
    /// a successor in place and withdraws the key, whose tokens no longer verify.
    #[tokio::test]
    async fn forced_rotation_and_revocation() {
        let f = Fixture::new(Duration::from_secs(365 * DAY)).await;
        let settings = CaSettings {
            root_online: true,
            ..CaSettings::default()
        };
        let ca = f.open(settings).await;
        let old = ca.keys().jwt().unwrap().0.to_owned();
        let (_, token, _) = mint(&ca.keys(), f.now(), 600, 600);
        let next = ca.rotate(KeyKind::Jwt, false).await.unwrap();
        assert_eq!(next.state, KeyState::Prepared);
        let set = ca.keys();
        assert_eq!(set.jwt().unwrap().0, old, "published first, not signing");
        assert!(set.jwks_json.contains(&next.id));
        assert_eq!(
            next.activate_at - unix_secs(f.now()),
            7200,
            "two refresh hints ahead"
        );
        f.advance(7200);
        ca.tick().await.unwrap();
        assert_eq!(ca.keys().jwt().unwrap().0, next.id);
        assert!(
            ca.keys().verify_jwt(&token).is_some(),
            "the retired key still verifies"
        );

        // Revoking the active key: a successor signs at once; the key's tokens fail.
        let (_, token2, _) = mint(&ca.keys(), f.now(), 600, 600);
        let gone = ca.revoke_key(&next.id, "leaked").await.unwrap();
        assert_eq!(gone.state, KeyState::Revoked);
        let set = ca.keys();
        let now_id = set.jwt().unwrap().0;
        assert!(now_id != next.id && now_id != old);
        assert!(!set.jwks_json.contains(&next.id));
        assert!(!set.bundle_json.contains(&next.id));
        assert!(set.verify_jwt(&token2).is_none());
        assert!(set.verify_jwt(&token).is_some());

        // An intermediate, immediately.
        let x = ca.keys().x509().unwrap().0.to_owned();
        let n = ca.rotate(KeyKind::X509, true).await.unwrap();
        assert_eq!(ca.keys().x509().unwrap().0, n.id);
        assert_ne!(n.id, x);
        assert!(matches!(
            ca.revoke_key("nope", "x").await,
            Err(KeyError::NotFound(_))
        ));
    }

    /// Two replicas on one store reaching a schedule point at once make one successor, and a
    /// replica whose key-encryption key differs publishes the keys but cannot sign with them.
    #[tokio::test]
    async fn replicas_share_keys_through_the_store() {
        let f = Fixture::new(Duration::from_secs(30 * DAY)).await;
        let settings = CaSettings {
            intermediate_ttl: Duration::from_secs(30 * DAY),
            jwt_key_ttl: Duration::from_secs(30 * DAY),
            root_online: true,
            ..CaSettings::default()
        };
        let (a, b) = (f.open(settings).await, f.open(settings).await);
        f.advance(16 * DAY);
        let (ra, rb) = tokio::join!(a.tick(), b.tick());
        ra.unwrap();
        rb.unwrap();
        b.refresh().await.unwrap();
        a.refresh().await.unwrap();
        let prepared = |c: &KeyRing| {
            c.keys()
                .keys
                .iter()
                .filter(|k| k.state == KeyState::Prepared)
                .map(|k| k.id.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(prepared(&a).len(), 2, "one per kind: {:?}", prepared(&a));
        assert_eq!(prepared(&a), prepared(&b));
        assert_eq!(a.keys().jwks_json, b.keys().jwks_json);

        std::fs::remove_file(f.dir.path().join(crate::datadir::KEY_WRAP)).unwrap();
        let c = f.open(settings).await;
        let set = c.keys();
        assert!(set.x509().is_err() && set.jwt().is_err());
        assert_eq!(
            set.jwks_json,
            a.keys().jwks_json,
            "it still publishes every key"
        );
        assert!(
            set.problems.iter().any(|p| p.contains("key-wrap.key")),
            "{:?}",
            set.problems
        );
    }
}
