//! The broker's side of the signing-key lifecycle: the worker that moves keys on their schedule
//! and follows other replicas' changes, and the admin operations (status, rotate, revoke a key,
//! stage an intermediate) with what they do to live credentials.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;

use super::Broker;
use crate::lease::keys::KeyError;
use crate::shutdown::ShutdownSignal;
use crate::store::{KeyKind, RevokeSet, Revoked, StoredKey};

/// The reason prefix of the revocation event a revoked key makes.
pub const KEY_REVOKED: &str = "key revoked: ";

/// How often at most a replica reads the keys and runs the schedule.
const KEY_REFRESH: Duration = Duration::from_secs(5);

/// A key with what `ca status` adds to it.
#[derive(Debug, Clone)]
pub struct KeyStatus {
    /// The key (without its private part).
    pub key: StoredKey,
    /// Honoured credentials it signed.
    pub live_credentials: u64,
    /// The intermediate's serial (lowercase hex), for X.509 keys with a certificate.
    pub serial: Option<String>,
}

/// What `ca revoke-key` did.
#[derive(Debug)]
pub struct KeyRevoked {
    /// The key, now revoked.
    pub key: StoredKey,
    /// The revocation of what it signed (`None` when nothing it signed was live).
    pub revoked: Option<Revoked>,
}

impl Broker {
    /// Every stored key with the live credentials it signed, active first.
    pub async fn key_status(&self) -> Result<Vec<KeyStatus>, KeyError> {
        self.ca.refresh().await?;
        let counts: std::collections::HashMap<String, u64> = self
            .store
            .live_by_signing_key(self.clock.unix_now())
            .await?
            .into_iter()
            .collect();
        Ok(self
            .ca
            .keys()
            .keys
            .iter()
            .map(|k| KeyStatus {
                live_credentials: counts.get(&k.id).copied().unwrap_or(0),
                serial: matches!(k.kind, KeyKind::X509 | KeyKind::Root)
                    .then(|| x509_parser::parse_x509_certificate(&k.public).ok())
                    .flatten()
                    .map(|(_, c)| c.raw_serial().iter().map(|b| format!("{b:02x}")).collect()),
                key: k.clone(),
            })
            .collect())
    }

    /// `ca rotate`: see [`crate::lease::keys::KeyRing::rotate`].
    pub async fn rotate_key(
        &self,
        kind: KeyKind,
        immediately: bool,
    ) -> Result<StoredKey, KeyError> {
        self.ca.rotate(kind, immediately).await
    }

    /// `ca revoke-key`: withdraws the key from every bundle (a successor signs from now on),
    /// then revokes every live credential it signed in one revocation event: watchers, the CRL
    /// and introspection learn of all of them at once, and Workload API streams holding one get
    /// a replacement signed by the new key. Asking again for a revoked key revokes anything
    /// still live it signed.
    pub async fn revoke_signing_key(&self, id: &str, reason: &str) -> Result<KeyRevoked, KeyError> {
        let key = self.ca.revoke_key(id, reason).await?;
        let revoked = self.sweep_key(&key.id).await?;
        Ok(KeyRevoked { key, revoked })
    }

    /// Revokes every live credential the revoked key `id` signed, in one event.
    async fn sweep_key(&self, id: &str) -> Result<Option<Revoked>, KeyError> {
        let reason = self
            .ca
            .keys()
            .keys
            .iter()
            .find(|k| k.id == id)
            .and_then(|k| k.note.clone())
            .unwrap_or_else(|| "revoked".into());
        let set = RevokeSet {
            signing_keys: vec![id.to_owned()],
            ..RevokeSet::default()
        };
        let reason = format!("{KEY_REVOKED}{reason}");
        let revoked = self
            .store
            .revoke_set(set, &reason, self.clock.unix_now())
            .await?;
        if let Some(r) = &revoked {
            crate::telemetry::revoked(&reason);
            self.bus.publish(r.event.clone());
            tracing::info!(target: "ephemera::audit", action = "RevokeSigningKey", key_id = %id, credentials = r.leases, reason = %reason, "signing key revoked: live credentials it signed revoked");
        }
        Ok(revoked)
    }

    /// `ca csr`: the pending intermediate's id and CSR (PEM), made now if none is pending.
    pub async fn intermediate_csr(&self) -> Result<(String, String), KeyError> {
        if self.ca.root_online() {
            return Err(KeyError::Precondition(
                "the broker holds the root key ([ca] root_key = \"online\"): it signs its own \
                 intermediates; `ephemera ca rotate --x509` rotates now"
                    .into(),
            ));
        }
        if self.ca.pending_csr().is_err() {
            self.ca.request_intermediate().await?;
        }
        self.ca.pending_csr()
    }

    /// `ca stage`: see [`crate::lease::keys::KeyRing::stage`].
    pub async fn stage_intermediate(&self, cert_der: &[u8]) -> Result<StoredKey, KeyError> {
        self.ca.stage(cert_der).await
    }
}

/// Runs the key schedule and keeps this replica's key set current: every [`KEY_REFRESH`] (or
/// sooner, for short-lived keys), and at once when another replica revokes a key.
pub struct KeyKeeper {
    /// The broker whose keys are kept.
    pub broker: Arc<Broker>,
}

impl KeyKeeper {
    /// Starts the worker; it stops at `shutdown`.
    ///
    /// A key revoked on another replica may still have signed here until this replica read
    /// the change: when a key is newly seen revoked, what it signed is revoked again at once
    /// and once more [`RESWEEP_AFTER`] later (after any mint that read the old key set has
    /// recorded its lease).
    pub fn start(self, mut shutdown: ShutdownSignal) -> JoinHandle<()> {
        tokio::spawn(async move {
            let broker = self.broker;
            let mut events = broker.bus.subscribe();
            let hint = broker.ca.settings().refresh_hint();
            let mut tick =
                tokio::time::interval((hint / 4).clamp(Duration::from_millis(250), KEY_REFRESH));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut seen = revoked_ids(&broker);
            let mut again: Vec<(tokio::time::Instant, String)> = Vec::new();
            loop {
                tokio::select! {
                    () = shutdown.wait() => return,
                    _ = tick.tick() => {}
                    ev = events.recv() => match ev {
                        Ok(r) if r.reason.starts_with(KEY_REVOKED) => {}
                        Ok(_) => continue,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    },
                }
                if let Err(e) = broker.ca.tick().await {
                    tracing::warn!(error = %e, "cannot run the signing-key schedule; retrying");
                    continue;
                }
                let now = tokio::time::Instant::now();
                let revoked = revoked_ids(&broker);
                let mut due: Vec<String> = revoked.difference(&seen).cloned().collect();
                again.extend(due.iter().map(|id| (now + RESWEEP_AFTER, id.clone())));
                seen = revoked;
                again.retain(|(at, id)| {
                    if *at <= now {
                        due.push(id.clone());
                        false
                    } else {
                        true
                    }
                });
                for id in due {
                    if let Err(e) = broker.sweep_key(&id).await {
                        tracing::warn!(key = %id, error = %e, "cannot revoke what a revoked key signed; retrying");
                        again.push((now + KEY_REFRESH, id));
                    }
                }
            }
        })
    }
}

/// How long after a key is first seen revoked what it signed is revoked once more.
const RESWEEP_AFTER: Duration = Duration::from_secs(3);

fn revoked_ids(broker: &Broker) -> std::collections::HashSet<String> {
    broker
        .ca
        .keys()
        .keys
        .iter()
        .filter(|k| k.state == crate::store::KeyState::Revoked)
        .map(|k| k.id.clone())
        .collect()
}
