//! CPU, memory, files and descriptors of the broker under test, read from `/proc`; the yardstick (single-core ES256 signing with ring) and percentiles.

use crate::*;

/// CPU seconds used by threads of `pid` whose name starts with one of `prefixes` (all threads
/// when `prefixes` is empty).
pub(crate) fn cpu_seconds(pid: u32, prefixes: &[&str]) -> f64 {
    threads_cpu_seconds(pid, prefixes).unwrap_or(0.0)
}

/// Like [`cpu_seconds`], but `None` when no thread matches.
pub(crate) fn threads_cpu_seconds(pid: u32, prefixes: &[&str]) -> Option<f64> {
    let ticks = 100.0; // USER_HZ on Linux
    let dir = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = 0u64;
    let mut matched = false;
    for entry in dir.flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ... : comm may hold spaces, so split at the last ')'.
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let comm = head.split_once('(').map_or("", |(_, c)| c);
        if !prefixes.is_empty() && !prefixes.iter().any(|p| comm.starts_with(p)) {
            continue;
        }
        matched = true;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // After ')': state is field 3 of the line, utime 14 and stime 15 → indexes 11 and 12.
        let utime: u64 = fields.get(11).and_then(|f| f.parse().ok()).unwrap_or(0);
        let stime: u64 = fields.get(12).and_then(|f| f.parse().ok()).unwrap_or(0);
        total += utime + stime;
    }
    matched.then(|| total as f64 / ticks)
}

/// Resident set size of `pid`, in MiB (current and peak).
pub(crate) fn rss_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Where the broker's CPU is read from.
#[derive(Clone)]
pub(crate) struct BrokerCpu {
    pub(crate) pid: Option<u32>,
    pub(crate) prefixes: Vec<&'static str>,
}

/// The threads of a SQLite store: sqlx runs each SQLite connection on a thread of its own.
pub(crate) const SQLITE_THREADS: &[&str] = &["sqlx-sqlite-wor"];

impl BrokerCpu {
    pub(crate) fn read(&self) -> Option<f64> {
        self.pid.map(|p| {
            let prefixes: Vec<&str> = self.prefixes.clone();
            cpu_seconds(p, &prefixes)
        })
    }

    /// CPU seconds of the broker's SQLite threads (part of [`Self::read`]); `None` when it has
    /// none (a broker on PostgreSQL).
    pub(crate) fn read_sqlite(&self) -> Option<f64> {
        threads_cpu_seconds(self.pid?, SQLITE_THREADS)
    }
}

// ---------------------------------------------------------------------------------------------
// Statistics

pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub(crate) fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

pub(crate) fn latency_json(mut v: Vec<Duration>) -> Value {
    v.sort();
    json!({
        "samples": v.len(),
        "p50_ms": ms(percentile(&v, 50.0)),
        "p90_ms": ms(percentile(&v, 90.0)),
        "p99_ms": ms(percentile(&v, 99.0)),
        "max_ms": ms(v.last().copied().unwrap_or_default()),
    })
}

// ---------------------------------------------------------------------------------------------
// The yardstick: single-core ES256 signing with ring

pub(crate) fn signing_rate(seconds: f64) -> anyhow::Result<f64> {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
        .map_err(|_| anyhow!("key generation"))?;
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
        .map_err(|_| anyhow!("key parsing"))?;
    // The size of a JWT-SVID signing input.
    let msg = [b'x'; 300];
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed().as_secs_f64() < seconds {
        for _ in 0..100 {
            key.sign(&rng, &msg).map_err(|_| anyhow!("signing"))?;
        }
        n += 100;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

pub(crate) fn dir_size(path: &Path) -> u64 {
    std::fs::read_dir(path)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("ephemera.db"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

pub(crate) fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}
