//! The report: the machine, and the table printed from the JSON report.

use crate::*;

pub(crate) fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| (kb / 1048576.0 * 10.0).round() / 10.0);
    json!({
        "cpu": model,
        "cores": cores,
        "memory_gib": mem,
        "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
    })
}

/// A JSON value as a table cell: strings bare, numbers as written, absent as "-".
pub(crate) fn cell(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

pub(crate) fn print_table(report: &Value) {
    let m = &report["machine"];
    println!(
        "ephemera-bench on {} ({} cores, {} GiB), {} build\n",
        cell(&m["cpu"]),
        m["cores"],
        m["memory_gib"],
        cell(&m["profile"])
    );
    if report["signing"].is_object() {
        println!(
            "single-core ES256 signing (ring): {} signatures/s\n",
            report["signing"]["es256_per_second"]
        );
    }
    if let Some(runs) = report["issuance"].as_array() {
        println!(
            "{:<8} {:<24} {:>9} {:>8} {:>8} {:>8} {:>8} {:>10} {:>6} {:>9} {:>8}",
            "issue",
            "credential",
            "per sec",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "max ms",
            "cpu us/cr",
            "x sig",
            "sqlite us",
            "l/commit"
        );
        for r in runs {
            println!(
                "{:<8} {:<24} {:>9} {:>8} {:>8} {:>8} {:>8} {:>10} {:>6} {:>9} {:>8}",
                cell(&r["transport"]),
                cell(&r["credential"]),
                cell(&r["per_second"]),
                cell(&r["latency"]["p50_ms"]),
                cell(&r["latency"]["p90_ms"]),
                cell(&r["latency"]["p99_ms"]),
                cell(&r["latency"]["max_ms"]),
                cell(&r["broker_cpu_us_per_credential"]),
                cell(&r["cpu_per_credential_in_signatures"]),
                cell(&r["sqlite_cpu_us_per_credential"]),
                cell(&r["leases_per_commit"]),
            );
        }
        println!();
    }
    if let Some(rev) = report["revocation"].as_object() {
        println!(
            "{:<16} {:>6} {:>14} {:>14} {:>14} {:>14} {:>12} {:>12}",
            "revocation",
            "tasks",
            "watch p50 ms",
            "watch p99 ms",
            "intro p50 ms",
            "intro p99 ms",
            "crl p50 ms",
            "crl p99 ms"
        );
        for key in ["end_task", "admin_revoke", "keep_alive_loss"] {
            let r = &rev[key];
            println!(
                "{:<16} {:>6} {:>14} {:>14} {:>14} {:>14} {:>12} {:>12}",
                key,
                cell(&r["tasks"]),
                cell(&r["to_watch_event"]["p50_ms"]),
                cell(&r["to_watch_event"]["p99_ms"]),
                cell(&r["to_introspection_inactive"]["p50_ms"]),
                cell(&r["to_introspection_inactive"]["p99_ms"]),
                cell(&r["to_crl"]["p50_ms"]),
                cell(&r["to_crl"]["p99_ms"]),
            );
        }
        println!("({})\n", rev["note"].as_str().unwrap_or(""));
    }
    if let Some(samples) = report["soak"]["samples"].as_array() {
        println!(
            "soak: {}s of mixed load, credentials of {}s",
            report["soak"]["seconds"], report["soak"]["credential_ttl_s"]
        );
        println!(
            "{:>8} {:>10} {:>9} {:>12}",
            "t (s)", "RSS (MiB)", "open fds", "credentials"
        );
        for x in samples {
            println!(
                "{:>8} {:>10} {:>9} {:>12}",
                cell(&x["t_s"]),
                cell(&x["rss_mib"]),
                cell(&x["open_fds"]),
                cell(&x["credentials"])
            );
        }
        println!(
            "RSS growth after the first sample: {} MiB; open fds: {:+}; request errors: {}\n",
            report["soak"]["rss_growth_mib"],
            report["soak"]["fd_growth"].as_i64().unwrap_or(0),
            report["soak"]["errors"]
        );
    }
    if report["lease_scale"].is_object() {
        let l = &report["lease_scale"];
        println!(
            "lease scale ({}): {} leases in {} tasks (filled in {}s)",
            cell(&l["store"]),
            l["leases"],
            l["tasks"],
            l["fill_seconds"]
        );
        println!("  database size            {} MiB", l["database_mib"]);
        println!("  restart to ready         {} ms", l["restart_to_ready_ms"]);
        println!(
            "  broker RSS               {} MiB ready, {} MiB at end, {} MiB peak",
            l["rss_mib_ready"], l["rss_mib_end"], l["rss_mib_peak"]
        );
        println!(
            "  ListLeases page (100)    p50 {} ms, p99 {} ms; active-only first page p50 {} ms; \
             one task's leases p50 {} ms, p99 {} ms",
            l["list_leases_page"]["p50_ms"],
            l["list_leases_page"]["p99_ms"],
            l["list_active_leases_first_page"]["p50_ms"],
            l["list_one_task_leases"]["p50_ms"],
            l["list_one_task_leases"]["p99_ms"]
        );
        let r = &l["revoke_task"];
        println!(
            "  revoke task ({} leases)  {} tasks: admin call p50 {} ms, max {} ms; watch event \
             with {} credentials p50 {} ms, max {} ms",
            r["leases"],
            r["watch_event"]["samples"],
            r["admin_call"]["p50_ms"],
            r["admin_call"]["max_ms"],
            r["credentials_in_event"],
            r["watch_event"]["p50_ms"],
            r["watch_event"]["max_ms"]
        );
        println!(
            "  CPU while 1%/min expire  {} ms per minute (sampled {}s)",
            l["idle_cpu"]["cpu_ms_per_minute"], l["idle_cpu"]["seconds_sampled"]
        );
    }
}

/// Logging for the in-process broker, as `log.level = "info"` with `log.format = "json"`
/// configures a deployed one (each line is written when its event happens), into `path` or an
/// unnamed temporary file.
pub(crate) fn broker_log(path: Option<&Path>) -> anyhow::Result<()> {
    let file = match path {
        Some(p) => std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        None => tempfile::tempfile()?,
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .json()
        .with_writer(std::sync::Mutex::new(file))
        .try_init()
        .map_err(|e| anyhow!("{e}"))
}
