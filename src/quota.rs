//! Per-identity quotas: a request rate (token bucket per SPIFFE ID), active tasks per identity,
//! and leases per task. Over a limit the caller gets `RESOURCE_EXHAUSTED` naming the limit.
//!
//! State is per broker and bounded: idle buckets and task counters are dropped when their maps
//! grow past [`MAX_TRACKED`], and a dropped task counter is re-read from the store on next use.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// Largest number of identities or tasks tracked in memory.
pub const MAX_TRACKED: usize = 100_000;

/// Configured limits; 0 means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaSettings {
    /// Sustained requests per second per SPIFFE ID.
    pub requests_per_second: u32,
    /// Requests an idle identity may make at once.
    pub burst: u32,
    /// Active tasks one SPIFFE ID may own.
    pub max_active_tasks_per_identity: u64,
    /// Credentials one task may hold.
    pub max_leases_per_task: u64,
}

impl Default for QuotaSettings {
    fn default() -> Self {
        Self {
            requests_per_second: 1000,
            burst: 2000,
            max_active_tasks_per_identity: 1000,
            max_leases_per_task: 100_000,
        }
    }
}

/// A limit that was reached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("limit {key} ({value}) reached{detail}")]
pub struct Exceeded {
    /// The config key of the limit.
    pub key: &'static str,
    /// Its value, with unit.
    pub value: String,
    /// What to do about it.
    pub detail: &'static str,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Quota state of one broker.
pub struct Quotas {
    settings: QuotaSettings,
    buckets: Mutex<HashMap<String, Bucket>>,
    task_leases: Mutex<HashMap<String, u64>>,
}

impl Quotas {
    /// Quotas with `settings`.
    pub fn new(settings: QuotaSettings) -> Self {
        Self {
            settings,
            buckets: Mutex::default(),
            task_leases: Mutex::default(),
        }
    }

    /// The configured limits.
    pub fn settings(&self) -> QuotaSettings {
        self.settings
    }

    /// Takes one request from `spiffe_id`'s bucket.
    pub fn admit(&self, spiffe_id: &str, now: Instant) -> Result<(), Exceeded> {
        let rate = f64::from(self.settings.requests_per_second);
        if rate == 0.0 {
            return Ok(());
        }
        let burst = f64::from(self.settings.burst.max(1));
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if buckets.len() >= MAX_TRACKED && !buckets.contains_key(spiffe_id) {
            // Forget identities whose bucket has refilled: they are idle.
            buckets.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst);
        }
        let b = buckets.entry(spiffe_id.to_owned()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(burst);
        b.at = now;
        if b.tokens < 1.0 {
            return Err(Exceeded {
                key: "limits.requests_per_second",
                value: format!("{}/s per identity", self.settings.requests_per_second),
                detail: "; retry later",
            });
        }
        b.tokens -= 1.0;
        Ok(())
    }

    /// Whether an identity owning `active` tasks may begin another.
    pub fn check_tasks(&self, active: u64) -> Result<(), Exceeded> {
        let max = self.settings.max_active_tasks_per_identity;
        if max > 0 && active >= max {
            return Err(Exceeded {
                key: "limits.max_active_tasks_per_identity",
                value: max.to_string(),
                detail: "; end tasks you no longer need",
            });
        }
        Ok(())
    }

    /// The leases counted for `task_id` in memory, if tracked.
    pub fn task_leases(&self, task_id: &str) -> Option<u64> {
        self.task_leases
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(task_id)
            .copied()
    }

    /// Whether a task holding `held` leases may get another.
    pub fn check_leases(&self, held: u64) -> Result<(), Exceeded> {
        let max = self.settings.max_leases_per_task;
        if max > 0 && held >= max {
            return Err(Exceeded {
                key: "limits.max_leases_per_task",
                value: max.to_string(),
                detail: "; begin a new task",
            });
        }
        Ok(())
    }

    /// Records that `task_id` holds `held` leases (after a lease was recorded).
    pub fn set_task_leases(&self, task_id: &str, held: u64) {
        let mut map = self
            .task_leases
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() >= MAX_TRACKED && !map.contains_key(task_id) {
            map.clear();
        }
        map.insert(task_id.to_owned(), held);
    }

    /// Whether leases per task are limited at all.
    pub fn limits_leases(&self) -> bool {
        self.settings.max_leases_per_task > 0
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn token_bucket_allows_the_burst_then_the_rate() {
        let q = Quotas::new(QuotaSettings {
            requests_per_second: 10,
            burst: 5,
            ..QuotaSettings::default()
        });
        let t0 = Instant::now();
        for _ in 0..5 {
            q.admit("spiffe://e.org/a", t0).unwrap();
        }
        let err = q.admit("spiffe://e.org/a", t0).unwrap_err();
        assert_eq!(err.key, "limits.requests_per_second");
        assert!(err.to_string().contains("10/s"), "{err}");
        // Another identity has its own bucket.
        q.admit("spiffe://e.org/b", t0).unwrap();
        // 100 ms later one token has come back.
        let later = t0 + Duration::from_millis(100);
        q.admit("spiffe://e.org/a", later).unwrap();
        assert!(q.admit("spiffe://e.org/a", later).is_err());
    }

    #[test]
    fn zero_means_unlimited() {
        let q = Quotas::new(QuotaSettings {
            requests_per_second: 0,
            burst: 0,
            max_active_tasks_per_identity: 0,
            max_leases_per_task: 0,
        });
        let t0 = Instant::now();
        for _ in 0..10_000 {
            q.admit("spiffe://e.org/a", t0).unwrap();
        }
        q.check_tasks(u64::MAX - 1).unwrap();
        q.check_leases(u64::MAX - 1).unwrap();
    }

    #[test]
    fn task_and_lease_limits_name_themselves() {
        let q = Quotas::new(QuotaSettings {
            max_active_tasks_per_identity: 2,
            max_leases_per_task: 3,
            ..QuotaSettings::default()
        });
        q.check_tasks(1).unwrap();
        assert_eq!(
            q.check_tasks(2).unwrap_err().key,
            "limits.max_active_tasks_per_identity"
        );
        q.check_leases(2).unwrap();
        assert_eq!(
            q.check_leases(3).unwrap_err().key,
            "limits.max_leases_per_task"
        );
        q.set_task_leases("t1", 3);
        assert_eq!(q.task_leases("t1"), Some(3));
    }
}
