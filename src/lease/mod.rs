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
use crate::store::{Revocation, Store, TaskState};

/// How many revocation events a slow listener may fall behind before it is cut off.
pub const BUS_CAPACITY: usize = 4096;
/// How often the reaper looks for due tasks.
pub const REAP_INTERVAL: Duration = Duration::from_secs(1);
/// Most tasks ended per reaper pass.
pub const REAP_BATCH: u32 = 1000;

/// In-process fan-out of committed revocations to watchers, the CRL and streams.
#[derive(Clone)]
pub struct RevocationBus {
    tx: broadcast::Sender<Revocation>,
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
        }
    }

    /// Publishes a revocation that is already committed to the store.
    pub fn publish(&self, r: Revocation) {
        let _ = self.tx.send(r);
    }

    /// Subscribes to revocations published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Revocation> {
        self.tx.subscribe()
    }
}

/// Why the reaper ended a task.
fn reap_reason(deadline: i64, now: i64) -> &'static str {
    if deadline <= now {
        "deadline passed"
    } else {
        "keep-alive lost"
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
    let due = match store.due_tasks(now, REAP_BATCH).await {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "reaper cannot read due tasks");
            return 0;
        }
    };
    let mut ended = 0;
    for task in due {
        let reason = reap_reason(task.deadline, now);
        match store
            .end_task(&task.id, TaskState::Expired, reason, now)
            .await
        {
            Ok(Some(r)) => {
                tracing::info!(task_id = %task.id, spiffe_id = %task.spiffe_id, reason, "task ended by the broker");
                crate::telemetry::revoked(reason);
                bus.publish(r);
                ended += 1;
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(task_id = %task.id, error = %e, "reaper cannot end task"),
        }
    }
    ended
}
