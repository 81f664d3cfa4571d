//! The benchmark program cannot rot: its smoke mode runs every part in seconds and reports
//! every figure the README quotes.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code: a failed unwrap is a failed test"
)]

#[test]
fn smoke_mode_reports_every_figure() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ephemera-bench"))
        .args(["--smoke", "--json"])
        .env_remove("EPHEMERA_BENCH_POSTGRES_URL")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(r["signing"]["es256_per_second"].as_f64().unwrap() > 0.0);

    let runs = r["issuance"].as_array().unwrap();
    assert_eq!(
        runs.len(),
        8,
        "tcp and unix × x509 (CSR), x509 (broker key), jwt; Workload API jwt and x509 streams"
    );
    let cases: Vec<String> = runs
        .iter()
        .map(|r| {
            format!(
                "{}:{}",
                r["transport"].as_str().unwrap(),
                r["credential"].as_str().unwrap()
            )
        })
        .collect();
    assert!(cases.contains(&"workload:jwt-svid".to_owned()), "{cases:?}");
    assert!(
        cases.contains(&"workload:x509-svid (stream+task)".to_owned()),
        "{cases:?}"
    );
    let mut sqlite_total = 0.0;
    for run in runs {
        assert!(run["credentials"].as_u64().unwrap() > 0, "{run}");
        assert_eq!(run["errors"], 0, "{run}");
        assert!(run["per_second"].as_f64().unwrap() > 0.0);
        for p in ["p50_ms", "p90_ms", "p99_ms", "max_ms"] {
            assert!(run["latency"][p].as_f64().unwrap() > 0.0, "{p}: {run}");
        }
        let broker = run["broker_cpu_us_per_credential"].as_f64().unwrap();
        assert!(broker > 0.0);
        // The SQLite store's threads are part of the broker's CPU.
        let sqlite = run["sqlite_cpu_us_per_credential"].as_f64().unwrap();
        assert!((0.0..=broker).contains(&sqlite), "{run}");
        sqlite_total += sqlite;
        assert!(run["cpu_per_credential_in_signatures"].as_f64().unwrap() > 0.0);
    }
    // Every lease is committed on those threads: over all the runs their CPU is not nothing (one
    // short run alone may fall between two of the kernel's 10 ms accounting ticks).
    assert!(sqlite_total > 0.0, "no SQLite CPU in any run: {runs:?}");

    for trigger in ["end_task", "admin_revoke", "keep_alive_loss"] {
        let t = &r["revocation"][trigger];
        for output in ["to_watch_event", "to_introspection_inactive", "to_crl"] {
            assert_eq!(t[output]["samples"], 5, "{trigger} {output}");
            assert!(t[output]["p99_ms"].as_f64().unwrap() > 0.0);
        }
    }

    let l = &r["lease_scale"];
    for key in [
        "database_mib",
        "restart_to_ready_ms",
        "rss_mib_ready",
        "rss_mib_peak",
    ] {
        assert!(l[key].as_f64().unwrap() > 0.0, "{key}: {l}");
    }
    assert!(l["list_leases_page"]["p50_ms"].as_f64().unwrap() > 0.0);
    assert!(l["list_one_task_leases"]["p50_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(l["revoke_task"]["credentials_in_event"], 10_000);
    assert!(l["idle_cpu"]["cpu_ms_per_minute"].as_f64().is_some());
}
