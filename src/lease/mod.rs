//! Tasks and leases over time: the revocation bus that tells every listener at once, and the
//! reaper that ends tasks whose deadline passed or whose keep-alive stopped.
//!
//! Memory stays bounded whatever the lease count: leases need no timers (a lease is honoured
//! only while unexpired and its task active), and the reaper asks the store only for tasks that
//! are due now, through an index.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, watch};

use crate::clock::Clock;
use crate::store::{Revocation, Store};

/// How many revocation events a slow listener may fall behind before it is cut off.
pub const BUS_CAPACITY: usize = 4096;
/// How often the reaper looks for due tasks.
pub const REAP_INTERVAL: Duration = Duration::from_secs(1);
/// Most tasks ended per reaper pass.
pub const REAP_BATCH: u32 = 1000;

/// How many recently published event numbers the bus remembers to drop repeats.
const RECENT: usize = 8192;

/// In-process fan-out of committed revocations to watchers, the CRL and streams.
///
/// Events come from this process (published right after its own commits) and, with a shared
/// database, from the store's feed of every replica's commits; an event this process already
/// published is not published again.
#[derive(Clone)]
pub struct RevocationBus {
    tx: broadcast::Sender<Revocation>,
    recent: Arc<std::sync::Mutex<Recent>>,
}

#[derive(Default)]
struct Recent {
    seen: std::collections::HashSet<i64>,
    order: std::collections::VecDeque<i64>,
}

impl Recent {
    /// Remembers `seq`; `false` if it was already known.
    fn insert(&mut self, seq: i64) -> bool {
        if !self.seen.insert(seq) {
            return false;
        }
        self.order.push_back(seq);
        if self.order.len() > RECENT
            && let Some(old) = self.order.pop_front()
        {
            self.seen.remove(&old);
        }
        true
    }
}

impl Default for RevocationBus {
    fn default() -> Self {
        Self::new()
    }
}

impl RevocationBus {
    /// A bus with [`BUS_CAPACITY`].
    pub fn new() -> Self {
        Self {
            tx: broadcast::channel(BUS_CAPACITY).0,
            recent: Arc::default(),
        }
    }

    /// Publishes a revocation this process has committed to the store.
    pub fn publish(&self, r: Revocation) {
        if let Ok(mut recent) = self.recent.lock() {
            recent.insert(r.seq);
        }
        let _ = self.tx.send(r);
    }

    /// Publishes a revocation read from the shared store, unless this process published it.
    pub fn publish_from_store(&self, r: Revocation) {
        let fresh = self
            .recent
            .lock()
            .map_or(true, |mut recent| recent.insert(r.seq));
        if fresh {
            let _ = self.tx.send(r);
        }
    }

    /// Subscribes to revocations published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Revocation> {
        self.tx.subscribe()
    }
}

/// Ends due tasks every [`REAP_INTERVAL`] until `shutdown`; prunes rows older than
/// `retention` every `prune_every`.
pub async fn reaper(
    store: Arc<dyn Store>,
    bus: RevocationBus,
    clock: Arc<dyn Clock>,
    retention: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(REAP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let prune_every = Duration::from_secs(600);
    let mut last_prune = tokio::time::Instant::now();
    loop {
        tokio::select! {
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    return;
                }
            }
            _ = tick.tick() => {
                reap_once(store.as_ref(), &bus, clock.as_ref()).await;
                if last_prune.elapsed() >= prune_every {
                    last_prune = tokio::time::Instant::now();
                    let before = clock.unix_now() - i64::try_from(retention.as_secs()).unwrap_or(i64::MAX);
                    match store.prune(before).await {
                        Ok(n) if n > 0 => tracing::info!(rows = n, "pruned expired and ended rows"),
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "prune failed"),
                    }
                }
            }
        }
    }
}

/// One reaper pass: ends every due task (deadline passed, keep-alive lost). Returns how many.
pub async fn reap_once(store: &dyn Store, bus: &RevocationBus, clock: &dyn Clock) -> usize {
    let now = clock.unix_now();
    let ended = match store.end_due_tasks(now, REAP_BATCH).await {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(error = %e, "reaper cannot end due tasks");
            return 0;
        }
    };
    let n = ended.len();
    for (task, event) in ended {
        tracing::info!(task_id = %task.id, spiffe_id = %task.spiffe_id, reason = %event.reason, "task ended by the broker");
        crate::telemetry::revoked(&event.reason);
        bus.publish(event);
    }
    n
}
