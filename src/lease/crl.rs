//! The CRL publisher: a worker that keeps the signed CRL current. It is built at start,
//! rebuilt promptly after every revocation (events arriving together are folded into one
//! rebuild, which reads only their credentials), and read afresh from the store periodically
//! (so expired serials drop off) and after missed events. Encoding and signing run on one
//! dedicated thread.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{Expansions, RevocationBus};
use crate::ca::MintError;
use crate::ca::crl::{RevokedEntry, RevokedSet};
use crate::clock::{Clock, unix_secs};
use crate::lease::keys::KeyRing;
use crate::shutdown::ShutdownSignal;
use crate::store::{Revocation, Store, StoreError};

/// How long a CRL is valid before relying parties must refetch it.
pub const CRL_VALIDITY: Duration = Duration::from_secs(900);

/// How often the CRL is rebuilt without revocations (to drop expired serials).
pub const CRL_REFRESH: Duration = Duration::from_secs(300);

/// Why a CRL could not be built.
#[derive(Debug, thiserror::Error)]
pub enum CrlError {
    /// The revoked credentials could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The CRL could not be encoded or signed.
    #[error(transparent)]
    Mint(#[from] MintError),
}

/// What a CRL rebuild starts from.
#[derive(Debug, Clone, Copy)]
pub enum CrlSource<'a> {
    /// Everything revoked, read from the store (at start, periodically, and after missed
    /// events).
    Store,
    /// The list kept since the last rebuild, plus the credentials of these revocations.
    Events(&'a [Revocation]),
}

/// The one thread CRLs are built on. A large CRL's buffers (megabytes, several per build) are
/// then allocated and freed by one thread and reused from its malloc arena; built on whichever
/// blocking-pool thread was free, each of them kept its own arena's worth, and a busy broker's
/// RSS grew by tens of MiB per thread.
struct CrlThread {
    jobs: std::sync::mpsc::Sender<Box<dyn FnOnce() + Send>>,
}

impl CrlThread {
    fn start() -> Self {
        let (jobs, rx) = std::sync::mpsc::channel::<Box<dyn FnOnce() + Send>>();
        let spawned = std::thread::Builder::new()
            .name("ephemera-crl".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job();
                }
            });
        if let Err(e) = spawned {
            // `run` then answers `None`, and the rebuild fails with a clear error.
            tracing::error!(error = %e, "cannot start the CRL thread");
        }
        Self { jobs }
    }

    /// Runs `job` on the thread; `None` if the thread is gone.
    async fn run<T: Send + 'static>(&self, job: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(job());
            }))
            .ok()?;
        rx.await.ok()
    }
}

/// Keeps the signed CRL: its state, its thread, and (once started) its run loop.
pub struct CrlPublisher {
    ca: Arc<KeyRing>,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    expansions: Arc<Expansions>,
    /// One CRL per published intermediate (key id, DER), the active one first.
    crl: std::sync::RwLock<Vec<(String, Bytes)>>,
    number: AtomicU64,
    /// What the CRL lists, kept between rebuilds; the mutex also makes rebuilds one at a time.
    revoked: Arc<tokio::sync::Mutex<RevokedSet>>,
    thread: CrlThread,
    updates: watch::Sender<u64>,
}

impl CrlPublisher {
    /// A publisher with no CRL yet (call [`Self::rebuild`] or [`Self::start`]).
    pub fn new(
        ca: Arc<KeyRing>,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        expansions: Arc<Expansions>,
    ) -> Self {
        Self {
            ca,
            store,
            clock,
            expansions,
            crl: std::sync::RwLock::default(),
            number: AtomicU64::new(0),
            revoked: Arc::default(),
            thread: CrlThread::start(),
            updates: watch::channel(0).0,
        }
    }

    /// The active intermediate's CRL (DER); empty until first built.
    pub fn current(&self) -> Bytes {
        self.crl
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .first()
            .map(|(_, der)| der.clone())
            .unwrap_or_default()
    }

    /// The CRL signed by the intermediate `key`, if it is published.
    pub fn for_key(&self, key: &str) -> Option<Bytes> {
        self.crl
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .find(|(id, _)| id == key)
            .map(|(_, der)| der.clone())
    }

    /// Every published intermediate's CRL, the active one first.
    pub fn all(&self) -> Vec<Bytes> {
        self.crl
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(_, der)| der.clone())
            .collect()
    }

    /// Notified every time the CRL is rebuilt.
    pub fn updates(&self) -> watch::Receiver<u64> {
        self.updates.subscribe()
    }

    /// Rebuilds the CRL: every serial no longer honoured and not yet expired. From
    /// [`CrlSource::Store`], the list is read afresh; from [`CrlSource::Events`], only the
    /// credentials of those revocations are read and added to the list kept since the last
    /// rebuild. Returns how many serials it lists.
    pub async fn rebuild(&self, source: CrlSource<'_>) -> Result<usize, CrlError> {
        let mut revoked = Arc::clone(&self.revoked).lock_owned().await;
        let now = self.clock.now();
        let now_unix = unix_secs(now);
        match source {
            CrlSource::Store => {
                let mut fresh = RevokedSet::default();
                for r in self.store.revoked_serials(now_unix).await? {
                    fresh.insert_hex(
                        &r.serial,
                        RevokedEntry {
                            revoked_at: r.revoked_at,
                            expires_at: r.expires_at,
                        },
                    )?;
                }
                *revoked = fresh;
            }
            CrlSource::Events(events) => {
                for event in events {
                    let leases = self
                        .expansions
                        .get(event, self.store.revoked_leases(event))
                        .await?;
                    for lease in leases.iter() {
                        let Some(serial) = lease.serial.as_deref() else {
                            continue;
                        };
                        revoked.insert_hex(
                            serial,
                            RevokedEntry {
                                revoked_at: lease.revoked_at.unwrap_or(event.at),
                                expires_at: lease.expires_at,
                            },
                        )?;
                    }
                }
            }
        }
        // Strictly increasing CRL numbers, also across restarts: milliseconds of the build,
        // bumped past the previous number when builds come faster than that.
        let stamp = u64::try_from(now_unix).unwrap_or(0) * 1000;
        let previous = self
            .number
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                Some(stamp.max(n + 1))
            })
            .unwrap_or(0);
        let number = stamp.max(previous + 1);
        // Encoding and signing a CRL of many serials is CPU-bound work: off the async workers,
        // so requests and streams are not held up behind it.
        // Every published intermediate signs the same list: a certificate's CRL is the one its
        // own issuer signed (serials are unique across intermediates).
        let keys = self.ca.keys();
        let (crls, listed) = self
            .thread
            .run(move || {
                revoked.drop_expired(now_unix);
                let mut crls = Vec::new();
                for (id, minter) in &keys.crl_signers {
                    let der = minter.crl(&revoked, number, now, now + CRL_VALIDITY)?;
                    crls.push((id.clone(), Bytes::from(der)));
                }
                Ok::<_, MintError>((crls, revoked.len()))
            })
            .await
            .ok_or_else(|| MintError::Signing("the CRL thread stopped".into()))??;
        *self
            .crl
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = crls;
        self.updates.send_modify(|n| *n += 1);
        Ok(listed)
    }

    /// Starts the run loop: rebuilds after the revocations `bus` announces, every
    /// [`CRL_REFRESH`], and from the store after missed events, until `shutdown`.
    pub fn start(
        self: &Arc<Self>,
        bus: &RevocationBus,
        shutdown: ShutdownSignal,
    ) -> JoinHandle<()> {
        let this = self.clone();
        let events = bus.subscribe();
        tokio::spawn(async move { this.run(events, shutdown).await })
    }

    async fn run(
        &self,
        mut events: tokio::sync::broadcast::Receiver<Revocation>,
        mut shutdown: ShutdownSignal,
    ) {
        let mut tick = tokio::time::interval(CRL_REFRESH);
        tick.tick().await;
        let mut folded = Vec::new();
        let mut keys = self.ca.subscribe();
        loop {
            let mut missed = false;
            tokio::select! {
                () = shutdown.wait() => return,
                _ = tick.tick() => missed = true,
                // A new key set: its intermediates sign the list kept (nothing new to read).
                changed = keys.changed() => if changed.is_err() { return },
                ev = events.recv() => match ev {
                    Ok(r) => folded.push(r),
                    Err(RecvError::Closed) => return,
                    Err(RecvError::Lagged(_)) => missed = true,
                },
            }
            let arrived = std::time::Instant::now();
            if !folded.is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            loop {
                match events.try_recv() {
                    Ok(r) => folded.push(r),
                    Err(TryRecvError::Lagged(_)) => missed = true,
                    Err(_) => break,
                }
            }
            let source = if missed {
                CrlSource::Store
            } else {
                CrlSource::Events(&folded)
            };
            if let Err(e) = self.rebuild(source).await {
                tracing::warn!(error = %e, "CRL rebuild failed; serving the previous one");
                // Events not yet listed must not be lost: read everything again soon.
                tick.reset_after(Duration::from_secs(1));
                folded.clear();
                continue;
            }
            if !folded.is_empty() {
                ::metrics::histogram!(crate::telemetry::PROPAGATION_SECONDS, "output" => "crl")
                    .record(arrived.elapsed().as_secs_f64());
            }
            folded.clear();
        }
    }
}
