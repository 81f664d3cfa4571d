//! Each identity's recent behaviour, for policy (`context.behaviour`): credentials issued in
//! the last minute and requests denied in the last ten minutes, as this replica saw them, plus
//! live tasks and the task's credentials (read from the store). Gathered only while a loaded
//! policy reads it, so brokers whose policies do not pay nothing for it.
//!
//! Memory is bounded: at most [`MAX_IDENTITIES`] identities are tracked, each in a few fixed
//! buckets; past that, the identity seen least recently is forgotten.

use std::collections::HashMap;
use std::sync::Mutex;

use super::caller::Caller;
use super::{Broker, BrokerError};
use crate::policy::cedar::BehaviourContext;

/// Most identities tracked at once.
pub const MAX_IDENTITIES: usize = 10_000;

/// Ten-second buckets over the last minute, one-minute buckets over the last ten minutes.
#[derive(Default)]
struct Counts {
    issued: [(i64, u32); 6],
    denied: [(i64, u32); 10],
    last_seen: i64,
}

fn add<const N: usize>(buckets: &mut [(i64, u32); N], slot: i64) {
    let i = usize::try_from(slot.rem_euclid(N as i64)).unwrap_or(0);
    if buckets[i].0 != slot {
        buckets[i] = (slot, 0);
    }
    buckets[i].1 = buckets[i].1.saturating_add(1);
}

fn sum<const N: usize>(buckets: &[(i64, u32); N], slot: i64) -> u64 {
    buckets
        .iter()
        .filter(|(s, _)| *s > slot - N as i64 && *s <= slot)
        .map(|(_, n)| u64::from(*n))
        .sum()
}

/// Recent issuance and denials per identity.
#[derive(Default)]
pub(super) struct Tracker {
    counts: Mutex<HashMap<String, Counts>>,
}

impl Tracker {
    fn with(&self, id: &str, now: i64, f: impl FnOnce(&mut Counts)) {
        let mut counts = self
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !counts.contains_key(id) && counts.len() >= MAX_IDENTITIES {
            let oldest = counts
                .iter()
                .min_by_key(|(_, c)| c.last_seen)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                counts.remove(&k);
            }
        }
        let c = counts.entry(id.to_owned()).or_default();
        c.last_seen = now;
        f(c);
    }

    /// A credential was issued to `id` at `now` (Unix seconds).
    pub(super) fn issued(&self, id: &str, now: i64) {
        self.with(id, now, |c| add(&mut c.issued, now.div_euclid(10)));
    }

    /// A request of `id` was denied at `now`.
    pub(super) fn denied(&self, id: &str, now: i64) {
        self.with(id, now, |c| add(&mut c.denied, now.div_euclid(60)));
    }

    /// (issued in the last minute, denied in the last ten minutes).
    pub(super) fn recent(&self, id: &str, now: i64) -> (u64, u64) {
        let counts = self
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        counts.get(id).map_or((0, 0), |c| {
            (
                sum(&c.issued, now.div_euclid(10)),
                sum(&c.denied, now.div_euclid(60)),
            )
        })
    }

    /// How many identities are tracked.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.counts.lock().map_or(0, |c| c.len())
    }
}

impl Broker {
    /// What policy sees of the caller's recent behaviour, when a loaded policy reads it.
    pub(super) async fn behaviour_of(
        &self,
        caller: &Caller,
    ) -> Result<Option<BehaviourContext>, BrokerError> {
        if !self.policy.uses_behaviour() {
            return Ok(None);
        }
        let id = caller.spiffe_id.as_str();
        let (issued_last_minute, denials_last_10_minutes) =
            self.behaviour.recent(id, self.clock.unix_now());
        let live_tasks = self.store.count_active_tasks(id).await?;
        let task_leases = match &caller.task {
            None => 0,
            Some(t) => match self.quotas.task_leases(&t.id) {
                Some(n) => n,
                None => self.store.count_task_leases(&t.id).await?,
            },
        };
        Ok(Some(BehaviourContext {
            issued_last_minute,
            denials_last_10_minutes,
            live_tasks,
            task_leases,
        }))
    }

    /// Counts an issued credential, while a policy reads behaviour.
    pub(super) fn count_issued(&self, spiffe_id: &str) {
        if self.policy.uses_behaviour() {
            self.behaviour.issued(spiffe_id, self.clock.unix_now());
        }
    }

    /// Counts a denial, while a policy reads behaviour.
    pub(super) fn count_denied(&self, spiffe_id: &str) {
        if self.policy.uses_behaviour() {
            self.behaviour.denied(spiffe_id, self.clock.unix_now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_age_out_of_their_windows_and_memory_is_bounded() {
        let t = Tracker::default();
        let now = 1_000_000;
        for _ in 0..3 {
            t.issued("a", now);
        }
        t.denied("a", now);
        assert_eq!(t.recent("a", now), (3, 1));
        assert_eq!(t.recent("a", now + 49), (3, 1));
        // Issuance leaves the window after a minute (ten-second buckets), denials after ten.
        assert_eq!(t.recent("a", now + 70), (0, 1));
        assert_eq!(t.recent("a", now + 660), (0, 0));
        assert_eq!(t.recent("nobody", now), (0, 0));
        for i in 0..MAX_IDENTITIES + 10 {
            t.issued(&format!("id{i}"), now + i64::try_from(i).unwrap());
        }
        assert_eq!(t.len(), MAX_IDENTITIES);
        assert_eq!(
            t.recent("a", now),
            (0, 0),
            "the least recently seen went first"
        );
    }
}
