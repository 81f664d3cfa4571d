//! Tasks and leases over time: the revocation bus that tells every listener at once, and the
//! reaper that ends tasks whose deadline passed or whose keep-alive stopped.
//!
//! Memory stays bounded whatever the lease count: leases need no timers (a lease is honoured
//! only while unexpired and its task active), and the reaper asks the store only for tasks that
//! are due now, through an index.

pub mod crl;
pub mod feed;
pub mod keys;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use crate::clock::Clock;
use crate::shutdown::ShutdownSignal;
use crate::store::{Lease, Revocation, Store, Task, TaskState};

/// How many revocation events a slow listener may fall behind before it is cut off.
pub const BUS_CAPACITY: usize = 4096;
/// How often the reaper looks for due tasks.
pub const REAP_INTERVAL: Duration = Duration::from_secs(1);
/// Most tasks ended per reaper pass.
pub const REAP_BATCH: u32 = 1000;

/// How many recently published event numbers the bus remembers to drop repeats.
const RECENT: usize = 8192;
/// Most active tasks remembered in memory; past it the cache starts over.
const ACTIVE_TASKS: usize = 16_384;

/// In-process fan-out of committed revocations to watchers, the CRL and streams.
///
/// Events come from this process (published right after its own commits) and, with a shared
/// database, from the store's feed of every replica's commits; an event this process already
/// published is not published again.
#[derive(Clone)]
pub struct RevocationBus {
    tx: broadcast::Sender<Revocation>,
    recent: Arc<std::sync::Mutex<Recent>>,
    active: Arc<std::sync::Mutex<ActiveTasks>>,
}

/// Active tasks read from the store, so a mint in a task need not read it again. Every task
/// end passes through the bus (this process's and, with a shared database, every replica's),
/// which drops the task here. The cache only saves a read: the store checks that the task is
/// active when it commits the lease, so an entry that is briefly stale (another replica's
/// `EndTask` not yet delivered) cannot get a credential recorded.
#[derive(Default)]
struct ActiveTasks {
    tasks: std::collections::HashMap<String, Arc<Task>>,
    /// Bumped by every task end; a read from before an end is not cached.
    generation: u64,
}

/// Where a task lookup stands, for [`RevocationBus::remember_task`].
#[derive(Debug, Clone, Copy)]
pub struct TaskGeneration(u64);

/// The credentials of recent revocation events, read once and shared: every watcher and the
/// CRL need the same list right after the event, and for a task with many leases that read is
/// the slow part of delivering it.
#[derive(Default)]
pub struct Expansions {
    recent: std::sync::Mutex<std::collections::VecDeque<(i64, Arc<Expansion>)>>,
}

/// One event's credentials, read by whoever asks first.
type Expansion = tokio::sync::OnceCell<Arc<Vec<Lease>>>;

/// Most recent events whose credentials are kept.
const EXPANSIONS: usize = 32;
/// Most credentials kept across them; older events are dropped past it.
const EXPANDED_LEASES: usize = 65_536;

impl Expansions {
    /// The credentials revoked by `event`: from a read already made (or under way) for the same
    /// event, or else from `read`.
    pub async fn get<E, F>(&self, event: &Revocation, read: F) -> Result<Arc<Vec<Lease>>, E>
    where
        F: std::future::Future<Output = Result<Vec<Lease>, E>>,
    {
        let cell = {
            let mut recent = self.lock();
            match recent.iter().find(|(seq, _)| *seq == event.seq) {
                Some((_, cell)) => cell.clone(),
                None => {
                    let cell = Arc::new(Expansion::new());
                    recent.push_back((event.seq, cell.clone()));
                    if recent.len() > EXPANSIONS {
                        recent.pop_front();
                    }
                    cell
                }
            }
        };
        let leases = cell
            .get_or_try_init(|| async { read.await.map(Arc::new) })
            .await?
            .clone();
        // Bound what is kept: drop the oldest events while the total is too large.
        let mut recent = self.lock();
        let mut total: usize = recent
            .iter()
            .filter_map(|(_, c)| c.get().map(|l| l.len()))
            .sum();
        while total > EXPANDED_LEASES && recent.len() > 1 {
            if let Some((_, c)) = recent.pop_front() {
                total -= c.get().map_or(0, |l| l.len());
            }
        }
        Ok(leases)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<(i64, Arc<Expansion>)>> {
        self.recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
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
            active: Arc::default(),
        }
    }

    /// Publishes a revocation this process has committed to the store.
    pub fn publish(&self, r: Revocation) {
        if let Ok(mut recent) = self.recent.lock() {
            recent.insert(r.seq);
        }
        self.forget_task(&r);
        let _ = self.tx.send(r);
    }

    /// Publishes a revocation read from the shared store, unless this process published it.
    pub fn publish_from_store(&self, r: Revocation) {
        let fresh = self
            .recent
            .lock()
            .map_or(true, |mut recent| recent.insert(r.seq));
        if fresh {
            self.forget_task(&r);
            let _ = self.tx.send(r);
        }
    }

    fn active(&self) -> std::sync::MutexGuard<'_, ActiveTasks> {
        self.active
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn forget_task(&self, r: &Revocation) {
        if let Some(id) = &r.task_id {
            let mut active = self.active();
            active.generation += 1;
            active.tasks.remove(id);
        } else if let Some(owner) = &r.spiffe_id {
            let mut active = self.active();
            active.generation += 1;
            active.tasks.retain(|_, t| t.spiffe_id != *owner);
        } else if r.is_set() {
            // Any task may be in the set.
            let mut active = self.active();
            active.generation += 1;
            active.tasks.clear();
        }
    }

    /// An active task remembered from an earlier lookup, and otherwise where lookups stand now
    /// (take it before reading the store, and give it to [`Self::remember_task`]).
    pub fn active_task(&self, id: &str) -> Result<Arc<Task>, TaskGeneration> {
        let active = self.active();
        active
            .tasks
            .get(id)
            .cloned()
            .ok_or(TaskGeneration(active.generation))
    }

    /// Remembers a task read from the store at `generation`, if it is active and no task ended
    /// since (the read may predate that end).
    pub fn remember_task(&self, task: &Arc<Task>, generation: TaskGeneration) {
        if task.state != TaskState::Active {
            return;
        }
        let mut active = self.active();
        if active.generation != generation.0 {
            return;
        }
        if active.tasks.len() >= ACTIVE_TASKS {
            active.tasks.clear();
        }
        active.tasks.insert(task.id.clone(), Arc::clone(task));
    }

    /// Subscribes to revocations published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Revocation> {
        self.tx.subscribe()
    }
}

/// The reaper: a worker that ends due tasks every [`REAP_INTERVAL`] (deadline passed,
/// keep-alive lost) and prunes rows older than `retention` every ten minutes.
pub struct Reaper {
    /// The store to reap.
    pub store: Arc<dyn Store>,
    /// Where the ends are announced.
    pub bus: RevocationBus,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// How long ended tasks and expired leases are kept.
    pub retention: Duration,
}

impl Reaper {
    /// Starts the worker; it stops at `shutdown`.
    pub fn start(self, mut shutdown: ShutdownSignal) -> JoinHandle<()> {
        tokio::spawn(async move {
            let Self {
                store,
                bus,
                clock,
                retention,
            } = self;
            let mut tick = tokio::time::interval(REAP_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let prune_every = Duration::from_secs(600);
            let mut last_prune = tokio::time::Instant::now();
            loop {
                tokio::select! {
                    () = shutdown.wait() => return,
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
        })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LeaseKind;

    fn event(seq: i64) -> Revocation {
        Revocation {
            seq,
            at: 100,
            task_id: Some(format!("t{seq}")),
            lease_id: None,
            spiffe_id: None,
            reason: "ended".into(),
        }
    }

    fn leases(n: usize) -> Vec<Lease> {
        (0..n)
            .map(|i| Lease {
                id: format!("l{i}"),
                task_id: Some("t".into()),
                kind: LeaseKind::Jwt,
                serial: None,
                spiffe_id: "spiffe://example.org/w".into(),
                principal: None,
                audience: vec!["a".into()],
                issued_at: 1,
                expires_at: 200,
                revoked: false,
                revoked_at: None,
                reason: None,
                signing_key: None,
            })
            .collect()
    }

    /// Concurrent askers for one event share a single read; another event reads again.
    #[tokio::test]
    async fn an_event_is_expanded_once() {
        let x = Expansions::default();
        let reads = std::sync::atomic::AtomicUsize::new(0);
        let read = |n| {
            let reads = &reads;
            async move {
                reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::task::yield_now().await;
                Ok::<_, std::convert::Infallible>(leases(n))
            }
        };
        let one = event(1);
        let (a, b) = tokio::join!(x.get(&one, read(3)), x.get(&one, read(3)));
        let (a, b) = (a.unwrap(), b.unwrap());
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(a.len(), 3);
        assert_eq!(reads.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(x.get(&event(2), read(1)).await.unwrap().len(), 1);
        assert_eq!(reads.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    /// A failed read is not kept: the next asker reads again.
    #[tokio::test]
    async fn a_failed_read_is_retried() {
        let x = Expansions::default();
        assert!(x.get(&event(1), async { Err("down") }).await.is_err());
        let got = x.get(&event(1), async { Ok::<_, &str>(leases(2)) }).await;
        assert_eq!(got.unwrap().len(), 2);
    }

    /// What is kept stays bounded in events and in credentials.
    #[tokio::test]
    async fn kept_expansions_are_bounded() {
        let x = Expansions::default();
        for seq in 0..100 {
            x.get(&event(seq), async { Ok::<_, ()>(leases(10)) })
                .await
                .unwrap();
        }
        assert_eq!(x.lock().len(), EXPANSIONS);
        for seq in 100..103 {
            x.get(&event(seq), async {
                Ok::<_, ()>(leases(EXPANDED_LEASES / 2))
            })
            .await
            .unwrap();
        }
        let kept: usize = x
            .lock()
            .iter()
            .filter_map(|(_, c)| c.get().map(|l| l.len()))
            .sum();
        assert!(kept <= EXPANDED_LEASES, "{kept} kept");
        assert!(x.lock().iter().any(|(seq, _)| *seq == 102));
    }
}
