//! Part 3: a million leases: fill, restart, listing, revocation of large tasks, memory.

use crate::*;

pub(crate) async fn fill(
    store: Arc<dyn Store>,
    tasks: usize,
    leases: usize,
    big: usize,
    big_tasks: usize,
) -> anyhow::Result<()> {
    let now = unix_now();
    // One principal per workload, as the unix attestor would have stored them; the bench's
    // mapping rule gives principal `w` the identity `bench/w<w>`.
    let mut principals = Vec::with_capacity(WORKLOADS);
    for w in 0..WORKLOADS {
        let claims = json!({"uid": BENCH_UID_BASE + w, "gid": 100, "w": w.to_string()});
        let p = StoredPrincipal::new(
            "unix",
            &format!("uid:{}", BENCH_UID_BASE + w),
            claims.as_object().unwrap_or(&serde_json::Map::new()),
            None,
        );
        store.remember_principal(&p, now).await?;
        principals.push(p.id);
    }
    let principals = Arc::new(principals);
    // Tasks stay live through the run: long heartbeat and grace, deadline tomorrow.
    let mut inflight = tokio::task::JoinSet::new();
    for i in 0..tasks {
        let store = store.clone();
        let principal = principals[i % WORKLOADS].clone();
        inflight.spawn(async move {
            store
                .insert_task(Task {
                    id: format!("task-{i:08}"),
                    spiffe_id: format!("spiffe://dev.local/bench/w{}", i % WORKLOADS),
                    attestor: "unix".into(),
                    principal: Some(principal),
                    claims: json!({"uid": BENCH_UID_BASE + i % WORKLOADS, "gid": 100,
                                   "w": (i % WORKLOADS).to_string()})
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
                    labels: Default::default(),
                    scopes: Vec::new(),
                    source_ip: None,
                    evidence_age_secs: 0,
                    created_at: now,
                    deadline: now + 86_400,
                    heartbeat_secs: 3600,
                    grace_secs: 3600,
                    due_at: now + 7200,
                    state: TaskState::Active,
                    ended_at: None,
                    reason: None,
                })
                .await
        });
        while inflight.len() >= 256 {
            if let Some(r) = inflight.join_next().await {
                r??;
            }
        }
    }
    while let Some(r) = inflight.join_next().await {
        r??;
    }
    // Tasks 0..big_tasks hold `big` leases each; the rest spread evenly. Expiry spread over 100
    // minutes, so 1% of the leases expire each minute.
    let in_big = big * big_tasks;
    let spread = leases.saturating_sub(in_big).max(1);
    for i in 0..leases {
        let store = store.clone();
        let task = if i < in_big {
            i / big
        } else {
            big_tasks + (i - in_big) % tasks.saturating_sub(big_tasks).max(1)
        };
        // The big tasks' leases outlive the run: their revocation lists every one of them.
        let expires = if i < in_big {
            now + 86_400
        } else {
            now + 60 + i64::try_from(((i - in_big) as u64 * 6000) / spread as u64).unwrap_or(0)
        };
        let principal = principals[task % WORKLOADS].clone();
        inflight.spawn(async move {
            store
                .insert_lease(Lease {
                    id: format!("lease-{i:09}"),
                    task_id: Some(format!("task-{task:08}")),
                    kind: if i % 2 == 0 {
                        LeaseKind::Jwt
                    } else {
                        LeaseKind::X509
                    },
                    serial: (i % 2 == 1).then(|| format!("{i:032x}")),
                    spiffe_id: format!("spiffe://dev.local/bench/w{}", task % WORKLOADS),
                    principal: Some(principal),
                    audience: if i % 2 == 0 {
                        vec!["bench".into()]
                    } else {
                        vec![]
                    },
                    issued_at: now,
                    expires_at: expires,
                    revoked: false,
                    revoked_at: None,
                    reason: None,
                    signing_key: None,
                })
                .await
        });
        while inflight.len() >= 2048 {
            if let Some(r) = inflight.join_next().await {
                r??;
            }
        }
    }
    while let Some(r) = inflight.join_next().await {
        r??;
    }
    Ok(())
}

/// Distinct workloads (principals and identities) of the lease-scale store.
const WORKLOADS: usize = 1000;

/// The first uid of the lease-scale store's principals (above any real user's).
const BENCH_UID_BASE: usize = 900_000;

/// The mapping rule that gives the lease-scale store's principals their identities.
const BENCH_MAPPING: &str = "[[mapping]]\nattestor = \"unix\"\nspiffe_id = \"spiffe://{trust_domain}/bench/w{claims.w}\"\nmatch = { gid = \"100\" }\n";

/// Tasks of 10,000 leases revoked in the lease-scale run, one after another.
pub(crate) const BIG_TASKS: usize = 3;

pub(crate) async fn lease_scale(args: &Args, store_url: Option<&str>) -> anyhow::Result<Value> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let mut opts = DevOptions::embedded(&data);
    opts.log_level = "error".into();
    opts.extra_config = format!("{}\n{BENCH_MAPPING}", store_config(store_url));
    let config = opts.prepare(dir.path())?;
    let big = 10_000.min(args.leases / 2);
    // Several such tasks, so the revocation is more than one sample (one in the smoke run).
    let big_tasks = BIG_TASKS.min(args.leases / (2 * big.max(1))).max(1);

    // Fill through the store itself (what a broker would have written over time).
    let fill_started = Instant::now();
    let db_bytes = match &config.store {
        ephemera::config::StoreConfig::Sqlite { path } => {
            let store = Arc::new(ephemera::store::sqlite::SqliteStore::open(path).await?);
            fill(store, args.tasks, args.leases, big, big_tasks).await?;
            dir_size(&data)
        }
        ephemera::config::StoreConfig::Postgres(pg) => {
            let store = Arc::new(ephemera::store::postgres::PostgresStore::open(pg).await?);
            fill(store.clone(), args.tasks, args.leases, big, big_tasks).await?;
            let bytes: i64 = sqlx::query_scalar("SELECT pg_database_size(current_database())")
                .fetch_one(store.pool())
                .await?;
            u64::try_from(bytes).unwrap_or(0)
        }
    };
    let fill_secs = fill_started.elapsed().as_secs_f64();

    // Restart to ready: a broker process on the filled store.
    let started = Instant::now();
    let (child, endpoints) = serve(&opts, dir.path(), &data).await?;
    let restart = started.elapsed();
    let pid = child.child.id();
    let (rss_ready, _) = rss_mib(pid);

    let channel = ConnectOptions {
        socket: Some(endpoints.broker_socket.clone()),
        ..ConnectOptions::default()
    }
    .connect()
    .await?;
    let target = Target {
        socket: endpoints.broker_socket.clone(),
        workload_socket: None,
        tcp: None,
        http: Some(endpoints.http_addr.clone()),
        tcp_evidence: None,
        admin_token: std::fs::read_to_string(&config.admin_token_file)
            .ok()
            .map(|t| t.trim().to_owned()),
        cpu: BrokerCpu {
            pid: Some(pid),
            prefixes: vec![],
        },
        _runtime: None,
        _running: None,
        _dir: None,
    };
    let mut admin = AdminClient::new(channel.clone());

    // ListLeases pages of 100: the first page and pages deep into the listing.
    let mut pages = Vec::new();
    let mut token = String::new();
    for _ in 0..50 {
        let t0 = Instant::now();
        let page = admin
            .list_leases(target.admin(ListLeasesRequest {
                page_size: 100,
                page_token: token.clone(),
                ..ListLeasesRequest::default()
            })?)
            .await?
            .into_inner();
        pages.push(t0.elapsed());
        token = page.next_page_token;
    }
    let mut active_pages = Vec::new();
    for _ in 0..20 {
        let t0 = Instant::now();
        admin
            .list_leases(target.admin(ListLeasesRequest {
                page_size: 100,
                state: "active".into(),
                ..ListLeasesRequest::default()
            })?)
            .await?;
        active_pages.push(t0.elapsed());
    }
    // One task's leases (an operator looking at one task): about ten, spread over the table.
    let mut task_pages = Vec::new();
    for i in 0..20 {
        let task_id = format!("task-{:08}", args.tasks.saturating_sub(1 + i));
        let t0 = Instant::now();
        let page = admin
            .list_leases(target.admin(ListLeasesRequest {
                page_size: 100,
                task_id,
                ..ListLeasesRequest::default()
            })?)
            .await?
            .into_inner();
        task_pages.push(t0.elapsed());
        if page.leases.is_empty() {
            bail!("a task of the lease-scale store listed no leases");
        }
    }

    // Revoking each task with `big` leases: the admin call, then its watch event with every
    // credential.
    let mut watch = RevocationsClient::new(channel.clone())
        .watch(WatchRequest { cursor: None })
        .await?
        .into_inner();
    let (mut revoke_calls, mut revoke_events, mut in_event) = (Vec::new(), Vec::new(), usize::MAX);
    for task in 0..big_tasks {
        let t0 = Instant::now();
        admin
            .revoke_task(target.admin(RevokeTaskRequest {
                task_id: format!("task-{task:08}"),
            })?)
            .await?;
        revoke_calls.push(t0.elapsed());
        let event = tokio::time::timeout(Duration::from_secs(60), watch.message())
            .await
            .context("no watch event")??
            .context("watch ended")?;
        revoke_events.push(t0.elapsed());
        in_event = in_event.min(event.credentials.len());
    }

    // A policy reload decides every live task and credential again: once with policies that
    // permit everything (nothing revoked), once with a policy that forbids one workload.
    let policy_dir = config.policy_dir.clone();
    let mut redecide = Vec::new();
    for (name, text) in [
        ("again.cedar", "permit (principal, action, resource);\n"),
        (
            "forbid-w0.cedar",
            "forbid (principal, action, resource) when { principal.spiffe_id == \"spiffe://dev.local/bench/w0\" };\n",
        ),
    ] {
        std::fs::write(policy_dir.join(name), text)?;
        let t0 = Instant::now();
        let r = admin
            .reload_policy(target.admin(ReloadPolicyRequest {})?)
            .await?
            .into_inner();
        redecide.push(json!({
            "policy": name,
            "admin_call_ms": ms(t0.elapsed()),
            "redecide_ms": r.redecide_ms,
            "tasks_decided": r.tasks_decided,
            "grants_decided": r.grants_decided,
            "credentials_decided": r.credentials_decided,
            "tasks_revoked": r.tasks_revoked.len(),
            "credentials_revoked": r.credentials_revoked,
        }));
    }

    // Reaper and idle CPU while leases expire at 1% a minute.
    let cpu0 = target.cpu.read().unwrap_or(0.0);
    tokio::time::sleep(Duration::from_secs_f64(args.reaper_seconds)).await;
    let cpu = target.cpu.read().unwrap_or(0.0) - cpu0;
    let (rss_now, rss_peak) = rss_mib(pid);

    Ok(json!({
        "store": if store_url.is_some() { "postgresql" } else { "sqlite" },
        "leases": args.leases,
        "tasks": args.tasks,
        "fill_seconds": (fill_secs * 10.0).round() / 10.0,
        "database_mib": (db_bytes as f64 / 1048576.0 * 10.0).round() / 10.0,
        "restart_to_ready_ms": ms(restart),
        "rss_mib_ready": (rss_ready * 10.0).round() / 10.0,
        "rss_mib_end": (rss_now * 10.0).round() / 10.0,
        "rss_mib_peak": (rss_peak * 10.0).round() / 10.0,
        "list_leases_page": latency_json(pages),
        "list_active_leases_first_page": latency_json(active_pages),
        "list_one_task_leases": latency_json(task_pages),
        "revoke_task": {
            "leases": big,
            "admin_call": latency_json(revoke_calls),
            "watch_event": latency_json(revoke_events),
            "credentials_in_event": in_event,
        },
        "policy_reload_redecide": redecide,
        "idle_cpu": {
            "seconds_sampled": args.reaper_seconds,
            "cpu_ms_per_minute": ((cpu / args.reaper_seconds * 60.0) * 1000.0).round(),
        },
    }))
}
