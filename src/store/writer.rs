//! The group-commit lease writer both backends use.

use super::{BoxFuture, Lease, StoreError};

/// A queued lease and who waits for its commit.
pub(crate) type QueuedLease = (Lease, tokio::sync::oneshot::Sender<Result<(), StoreError>>);

/// Writes one batch of leases in one transaction; says, per lease, whether it was written
/// (`false`: its task was no longer active).
pub(crate) type WriteBatch =
    Box<dyn for<'a> Fn(&'a [Lease]) -> BoxFuture<'a, Result<Vec<bool>, StoreError>> + Send>;

/// How long a contended writer waits for more leases before it commits (see [`lease_writer`]).
pub(crate) const COMMIT_LINGER: std::time::Duration = std::time::Duration::from_micros(500);

/// Group commit: one writer drains every queued lease (up to `batch`) into one transaction,
/// then acknowledges each waiter.
///
/// Alone, a lease commits at once. Under load — leases were already waiting when the last
/// commit finished — the writer first lingers up to [`COMMIT_LINGER`] for the leases being
/// minted at that moment, as PostgreSQL's `commit_delay` does: a commit costs the same few
/// round trips and index pages for one lease as for fifty, and without the wait a fast writer
/// commits leases one by one.
pub(crate) async fn lease_writer(
    mut rx: tokio::sync::mpsc::Receiver<QueuedLease>,
    batch: usize,
    write: WriteBatch,
) {
    let mut queued = Vec::with_capacity(batch);
    let mut leases = Vec::with_capacity(batch);
    let mut contended = false;
    while rx.recv_many(&mut queued, batch).await > 0 {
        if contended {
            let linger = tokio::time::sleep(COMMIT_LINGER);
            tokio::pin!(linger);
            while queued.len() < batch {
                let room = batch - queued.len();
                tokio::select! {
                    () = &mut linger => break,
                    n = rx.recv_many(&mut queued, room) => if n == 0 { break },
                }
            }
        }
        let started = std::time::Instant::now();
        let acks: Vec<_> = queued
            .drain(..)
            .map(|(lease, ack)| {
                leases.push(lease);
                ack
            })
            .collect();
        let result = write(&leases).await;
        ::metrics::histogram!(crate::telemetry::COMMIT_SECONDS)
            .record(started.elapsed().as_secs_f64());
        ::metrics::histogram!(crate::telemetry::COMMIT_BATCH).record(leases.len() as f64);
        for (i, (lease, ack)) in leases.drain(..).zip(acks).enumerate() {
            let _ = ack.send(match &result {
                Ok(written) if written.get(i).copied().unwrap_or(false) => Ok(()),
                Ok(_) => Err(StoreError::TaskNotActive(lease.task_id.unwrap_or_default())),
                Err(e) => Err(e.duplicate()),
            });
        }
        contended = !rx.is_empty();
    }
}
