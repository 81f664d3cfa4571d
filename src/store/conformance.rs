//! The one conformance suite every backend must pass.

use super::*;

fn token(hash: u8, expires_at: i64) -> NewJoinToken {
    let mut claims = serde_json::Map::new();
    claims.insert("rack".into(), serde_json::Value::from("r7"));
    NewJoinToken {
        hash: [hash; 32],
        id: format!("jt-{hash}"),
        name: "build-box".into(),
        claims,
        created_at: 1_000,
        expires_at,
    }
}

/// A task row for tests.
pub fn task(id: &str, spiffe_id: &str, deadline: i64, due_at: i64) -> Task {
    Task {
        id: id.into(),
        spiffe_id: spiffe_id.into(),
        attestor: "unix".into(),
        principal: None,
        claims: serde_json::Map::new(),
        labels: [("env".to_owned(), "test".to_owned())].into(),
        scopes: vec!["deploy:staging".into(), "tickets:read".into()],
        source_ip: Some("10.1.2.3".into()),
        evidence_age_secs: 5,
        created_at: 100,
        deadline,
        heartbeat_secs: 10,
        grace_secs: 30,
        due_at,
        state: TaskState::Active,
        ended_at: None,
        reason: None,
    }
}

pub fn lease(id: &str, task: Option<&str>, serial: Option<&str>, expires_at: i64) -> Lease {
    Lease {
        id: id.into(),
        task_id: task.map(Into::into),
        kind: if serial.is_some() {
            LeaseKind::X509
        } else {
            LeaseKind::Jwt
        },
        serial: serial.map(Into::into),
        spiffe_id: "spiffe://e.org/a".into(),
        principal: None,
        audience: if serial.is_some() {
            vec![]
        } else {
            vec!["aud".into()]
        },
        issued_at: 100,
        expires_at,
        revoked: false,
        revoked_at: None,
        reason: None,
        signing_key: None,
    }
}

/// Leases racing their task's end: every lease written is in the task's revocation event as
/// read right when the end commits.
pub async fn ended_task_covers_racing_leases(store: std::sync::Arc<dyn Store>) {
    for round in 0..10 {
        let id = format!("race{round}");
        store
            .insert_task(task(&id, "spiffe://e.org/r", 1_000, 900))
            .await
            .unwrap();
        let writers: Vec<_> = (0..8)
            .map(|i| {
                let (st, id) = (store.clone(), id.clone());
                tokio::spawn(async move {
                    let l = lease(&format!("{id}-{i}"), Some(&id), None, 150);
                    st.insert_lease(l).await.map(|()| format!("{id}-{i}"))
                })
            })
            .collect();
        tokio::task::yield_now().await;
        let ev = store
            .end_task(&id, TaskState::Ended, "done", 140)
            .await
            .unwrap()
            .unwrap();
        // What relying parties learn of the event: read now, while writers may still be
        // committing. A lease written after this read would have escaped the revocation.
        let mut revoked: Vec<String> = store
            .revoked_leases(&ev)
            .await
            .unwrap()
            .into_iter()
            .map(|l| l.id)
            .collect();
        let mut written = Vec::new();
        for w in writers {
            match w.await.unwrap() {
                Ok(lease_id) => written.push(lease_id),
                Err(StoreError::TaskNotActive(t)) => assert_eq!(t, id),
                Err(e) => panic!("{e}"),
            }
        }
        written.sort();
        revoked.sort();
        assert_eq!(written, revoked, "round {round}");
    }
}

/// Tasks, leases and revocations: lifecycle, one-write task revocation, the CRL query,
/// the event log, listings with filters and paging, restart refresh, pruning.
pub async fn tasks_and_leases(store: std::sync::Arc<dyn Store>) {
    let s = store.as_ref();
    assert_eq!(s.newest_revocation().await.unwrap(), 0, "no events yet");
    s.insert_task(task("t1", "spiffe://e.org/a", 1_000, 140))
        .await
        .unwrap();
    s.insert_task(task("t2", "spiffe://e.org/a", 1_000, 500))
        .await
        .unwrap();
    s.insert_task(task("t3", "spiffe://e.org/b", 120, 120))
        .await
        .unwrap();
    assert!(matches!(
        s.insert_task(task("t1", "x", 1, 1)).await,
        Err(StoreError::Conflict)
    ));
    let t1 = s.task("t1").await.unwrap().unwrap();
    assert_eq!(
        t1,
        task("t1", "spiffe://e.org/a", 1_000, 140),
        "stored as given"
    );
    assert!(s.task("nope").await.unwrap().is_none());

    // Leases, concurrently through group commit.
    let mut writers = Vec::new();
    for i in 0..50 {
        let st = store.clone();
        writers.push(tokio::spawn(async move {
            st.insert_lease(lease(&format!("l{i:02}"), Some("t1"), None, 900))
                .await
        }));
    }
    for w in writers {
        w.await.unwrap().unwrap();
    }
    s.insert_lease(lease("x1", Some("t1"), Some("aa01"), 900))
        .await
        .unwrap();
    s.insert_lease(lease("x2", None, Some("aa02"), 900))
        .await
        .unwrap();
    s.insert_lease(lease("x3", None, Some("aa03"), 900))
        .await
        .unwrap();
    s.insert_lease(lease("x5", None, Some("aa05"), 150))
        .await
        .unwrap();
    assert!(
        s.revoke_lease("x5", "compromised", 120)
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        s.insert_lease(lease("x4", None, Some("aa01"), 900))
            .await
            .is_err(),
        "serials are unique"
    );
    let by_serial = s.lease("aa01").await.unwrap().unwrap();
    assert_eq!(by_serial.lease.id, "x1");
    assert!(by_serial.active(200));

    // Due tasks and keep-alive.
    let due: Vec<String> = s
        .due_tasks(140, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(due, ["t3", "t1"]);
    assert!(s.keep_alive("t1", 2_000).await.unwrap());
    assert_eq!(
        s.task("t1").await.unwrap().unwrap().due_at,
        1_000,
        "capped at the deadline"
    );

    // Ending a task: one event, its leases inactive, idempotent.
    let ev = s
        .end_task("t1", TaskState::Ended, "done", 200)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (ev.task_id.as_deref(), ev.reason.as_str()),
        (Some("t1"), "done")
    );
    assert!(
        s.end_task("t1", TaskState::Revoked, "again", 201)
            .await
            .unwrap()
            .is_none()
    );
    assert!(!s.keep_alive("t1", 300).await.unwrap());
    assert!(!s.lease("l07").await.unwrap().unwrap().active(200));
    assert_eq!(s.revoked_leases(&ev).await.unwrap().len(), 51);

    // A lease of an ended task is refused, also when it shares a group commit with leases
    // that are written.
    let (late, fine) = tokio::join!(
        store.insert_lease(lease("late", Some("t1"), None, 900)),
        store.insert_lease(lease("fine", Some("t2"), None, 150)),
    );
    assert!(
        matches!(&late, Err(StoreError::TaskNotActive(t)) if t == "t1"),
        "{late:?}"
    );
    fine.unwrap();
    assert!(s.lease("late").await.unwrap().is_none(), "nothing written");
    assert_eq!(s.revoked_leases(&ev).await.unwrap().len(), 51);

    // Revoking a single lease.
    let ev2 = s.revoke_lease("x2", "admin", 210).await.unwrap().unwrap();
    let x5_seq = s.revocations_after(0, 10).await.unwrap()[0].seq;
    assert!(ev2.seq > ev.seq);
    assert!(s.revoke_lease("x2", "admin", 211).await.unwrap().is_none());
    // Expansions carry each lease whole (audience, serial, revocation), in id order.
    assert_eq!(
        *s.revoked_leases(&ev2).await.unwrap(),
        [s.lease("x2").await.unwrap().unwrap().lease]
    );
    let expanded = s.revoked_leases(&ev).await.unwrap();
    assert!(expanded.windows(2).all(|w| w[0].id < w[1].id));
    for l in &expanded {
        assert_eq!(*l, s.lease(&l.id).await.unwrap().unwrap().lease);
    }

    // The CRL query: task-ended and revoked X.509 leases until their expiry (x5 expired).
    let serials: Vec<String> = s
        .revoked_serials(210)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.serial)
        .collect();
    assert_eq!(serials, ["aa01", "aa02"]);
    assert!(s.revoked_serials(901).await.unwrap().is_empty());

    // The event log, in order, after a cursor.
    let all = s.revocations_after(0, 10).await.unwrap();
    assert_eq!(
        all.iter().map(|r| r.seq).collect::<Vec<_>>(),
        [x5_seq, ev.seq, ev2.seq]
    );
    assert_eq!(s.revocations_after(ev.seq, 10).await.unwrap().len(), 1);
    assert!(x5_seq < ev.seq);
    assert_eq!(s.newest_revocation().await.unwrap(), ev2.seq);

    // Listings.
    let f = |spiffe: Option<&str>, state: Option<&str>, after: Option<&str>, limit| ListFilter {
        task_id: None,
        spiffe_id: spiffe.map(Into::into),
        state: state.map(Into::into),
        after: after.map(Into::into),
        limit,
    };
    let ids = |v: Vec<Task>| v.into_iter().map(|t| t.id).collect::<Vec<_>>();
    // Newest first.
    assert_eq!(
        ids(s.list_tasks(f(None, None, None, 10), 200).await.unwrap()),
        ["t3", "t2", "t1"]
    );
    assert_eq!(
        ids(s
            .list_tasks(f(Some("spiffe://e.org/a"), Some("active"), None, 10), 200)
            .await
            .unwrap()),
        ["t2"]
    );
    // The next page starts after the previous page's last (oldest) row.
    assert_eq!(
        ids(s
            .list_tasks(f(None, None, Some("t3"), 1), 200)
            .await
            .unwrap()),
        ["t2"]
    );
    // Every state a task shows is a filter, and `inactive` is any but active.
    let t1_state = s.task("t1").await.unwrap().unwrap().state;
    assert_ne!(t1_state, TaskState::Active);
    for state in [t1_state.as_str(), "inactive"] {
        assert_eq!(
            ids(s
                .list_tasks(f(None, Some(state), None, 10), 200)
                .await
                .unwrap()),
            ["t1"],
            "{state}"
        );
    }
    let leases = s
        .list_leases(
            ListFilter {
                task_id: Some("t1".into()),
                limit: 100,
                ..ListFilter::default()
            },
            200,
        )
        .await
        .unwrap();
    assert_eq!(leases.len(), 51);
    assert!(
        leases.windows(2).all(|w| w[0].lease.id > w[1].lease.id),
        "newest first"
    );
    let active = s
        .list_leases(f(None, Some("active"), None, 100), 200)
        .await
        .unwrap();
    assert_eq!(
        active
            .iter()
            .map(|l| l.lease.id.as_str())
            .collect::<Vec<_>>(),
        ["x3"]
    );
    let inactive = s
        .list_leases(f(None, Some("inactive"), None, 1000), 200)
        .await
        .unwrap();
    assert!(!inactive.is_empty());
    assert!(inactive.iter().all(|l| !l.active(200)));
    let in_ended_task = s
        .list_leases(
            f(
                None,
                Some(&format!("task_{}", t1_state.as_str())),
                None,
                1000,
            ),
            200,
        )
        .await
        .unwrap();
    assert!(!in_ended_task.is_empty());
    assert!(
        in_ended_task
            .iter()
            .all(|l| l.lease.task_id.as_deref() == Some("t1")
                && !l.lease.revoked
                && l.lease.expires_at > 200)
    );
    assert_eq!(ids(s.active_tasks(None, 10).await.unwrap()), ["t2", "t3"]);
    assert_eq!(
        ids(s.active_tasks(Some("t2".into()), 10).await.unwrap()),
        ["t3"]
    );

    // Counts for metrics: t2 and t3 active; x3 the only honoured lease.
    assert_eq!(s.counts(200).await.unwrap(), (2, 1));
    // Quota counts: a/t2 is active (t1 ended); b/t3 active.
    assert_eq!(s.count_active_tasks("spiffe://e.org/a").await.unwrap(), 1);
    assert_eq!(
        s.count_active_tasks("spiffe://e.org/nobody").await.unwrap(),
        0
    );
    assert_eq!(s.count_task_leases("t-none").await.unwrap(), 0);
    let in_t1 = s
        .list_leases(
            ListFilter {
                task_id: Some("t1".into()),
                limit: 1000,
                ..ListFilter::default()
            },
            200,
        )
        .await
        .unwrap()
        .len() as u64;
    assert!(in_t1 > 0);
    assert_eq!(s.count_task_leases("t1").await.unwrap(), in_t1);

    // Restart: live tasks get a fresh grace, capped at their deadline.
    assert_eq!(s.refresh_active_tasks(300).await.unwrap(), 2);
    assert_eq!(s.task("t2").await.unwrap().unwrap().due_at, 340);
    assert_eq!(s.task("t3").await.unwrap().unwrap().due_at, 120);

    // Pruning: expired leases, ended tasks without leases, old events.
    assert!(s.prune(950).await.unwrap() > 0);
    assert!(s.lease("x1").await.unwrap().is_none());
    assert!(s.task("t1").await.unwrap().is_none());
    assert!(
        s.task("t2").await.unwrap().is_some(),
        "active tasks are never pruned"
    );
    assert!(s.revocations_after(0, 10).await.unwrap().is_empty());

    // Expansions survive text that needs escaping on its way through the database's JSON.
    let mut odd = lease("q\"1", Some("t2"), None, 900);
    odd.audience = vec!["a\"b\\c".into(), "ünï\u{1}\n".into()];
    store.insert_lease(odd).await.unwrap();
    let ev3 = s
        .revoke_lease("q\"1", "said \"stop\"\t", 960)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        *s.revoked_leases(&ev3).await.unwrap(),
        [s.lease("q\"1").await.unwrap().unwrap().lease]
    );
}

/// Join tokens: stored by hash, single use, expiry honoured, concurrent use has one winner.
pub async fn join_tokens(store: std::sync::Arc<dyn Store>) {
    store.ping().await.unwrap();
    store.create_join_token(token(1, 2_000)).await.unwrap();
    assert!(matches!(
        store.create_join_token(token(1, 2_000)).await,
        Err(StoreError::Conflict)
    ));
    let got = store.join_token([1; 32]).await.unwrap().unwrap();
    assert_eq!(got.name, "build-box");
    assert_eq!(got.claims["rack"], "r7");
    assert_eq!(got.used_at, None);
    assert!(store.join_token([9; 32]).await.unwrap().is_none());

    // Expired tokens cannot be consumed.
    assert!(!store.consume_join_token([1; 32], 2_000).await.unwrap());
    // Concurrent use: exactly one winner.
    let mut handles = Vec::new();
    for _ in 0..8 {
        let s = store.clone();
        handles.push(tokio::spawn(async move {
            s.consume_join_token([1; 32], 1_500).await.unwrap()
        }));
    }
    let mut wins = 0;
    for h in handles {
        if h.await.unwrap() {
            wins += 1;
        }
    }
    assert_eq!(wins, 1);
    assert_eq!(
        store.join_token([1; 32]).await.unwrap().unwrap().used_at,
        Some(1_500)
    );
    assert!(!store.consume_join_token([9; 32], 1_500).await.unwrap());
}

/// Revoking an identity: its active tasks end and its unexpired credentials are revoked, in a
/// task or not, in one event whose expansion lists exactly them; another identity's lease and an
/// expired one are left alone; a second revocation finds nothing.
pub async fn identity_revocation(store: std::sync::Arc<dyn Store>) {
    let a = "spiffe://e.org/a";
    store
        .insert_task(task("ta", a, 10_000, 5_000))
        .await
        .unwrap();
    store
        .insert_task(task("tb", "spiffe://e.org/b", 10_000, 5_000))
        .await
        .unwrap();
    store
        .insert_lease(lease("l1", Some("ta"), Some("0a01"), 9_000))
        .await
        .unwrap();
    store
        .insert_lease(lease("l2", None, None, 9_000))
        .await
        .unwrap();
    store
        .insert_lease(lease("l3", None, None, 500))
        .await
        .unwrap();
    let mut other = lease("l4", Some("tb"), None, 9_000);
    other.spiffe_id = "spiffe://e.org/b".into();
    store.insert_lease(other).await.unwrap();

    let r = store
        .revoke_identity(a, "identity revoked", 1_000)
        .await
        .unwrap()
        .expect("a held something");
    assert_eq!(r.task_ids, ["ta"]);
    assert_eq!(
        r.leases, 2,
        "the unexpired ones, in the task and standalone"
    );
    assert_eq!(r.event.spiffe_id.as_deref(), Some(a));
    assert_eq!(
        (r.event.task_id.clone(), r.event.lease_id.clone()),
        (None, None)
    );
    let mut expanded: Vec<String> = store
        .revoked_leases(&r.event)
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.id)
        .collect();
    expanded.sort();
    assert_eq!(expanded, ["l1", "l2"]);
    assert_eq!(
        store.revocations_after(r.event.seq - 1, 10).await.unwrap(),
        std::slice::from_ref(&r.event)
    );
    for id in ["l1", "l2"] {
        assert!(
            !store.lease(id).await.unwrap().unwrap().active(1_000),
            "{id}"
        );
    }
    assert!(store.lease("l4").await.unwrap().unwrap().active(1_000));
    assert_eq!(
        store.task("tb").await.unwrap().unwrap().state,
        TaskState::Active
    );
    assert_eq!(
        store.revoke_identity(a, "again", 1_001).await.unwrap(),
        None
    );
}

/// Principals, grants, one set revocation of tasks and grants, locks, and pruning of what
/// nothing names.
pub async fn principals_sets_and_locks(store: std::sync::Arc<dyn Store>) {
    use super::{RevokeSet, StoredLock, StoredPrincipal};
    let claims = serde_json::json!({"repository": "acme/api", "n": 1});
    let claims = claims.as_object().unwrap();
    let p = StoredPrincipal::new("oidc", "iss#sub", claims, Some("10.0.0.1".into()));
    let q = StoredPrincipal::new("unix", "uid:7", &serde_json::Map::new(), None);
    assert_ne!(p.id, q.id);
    assert_eq!(
        p.id,
        StoredPrincipal::new("oidc", "iss#sub", claims, Some("10.0.0.1".into())).id,
        "equal callers share one principal"
    );
    store.remember_principal(&p, 100).await.unwrap();
    store.remember_principal(&p, 150).await.unwrap();
    store.remember_principal(&q, 100).await.unwrap();
    let got = store
        .principals(vec![p.id.clone(), "unknown".into()])
        .await
        .unwrap();
    assert_eq!(got, std::slice::from_ref(&p));

    let mut t = task("tp", "spiffe://e.org/a", 10_000, 5_000);
    t.principal = Some(p.id.clone());
    store.insert_task(t).await.unwrap();
    store
        .insert_task(task("tq", "spiffe://e.org/b", 10_000, 5_000))
        .await
        .unwrap();
    let with = |id: &str, task: Option<&str>, serial: Option<&str>, principal: &str| {
        let mut l = lease(id, task, serial, 9_000);
        l.principal = Some(principal.to_owned());
        l
    };
    for l in [
        with("s1", None, None, &p.id),
        with("s2", None, None, &p.id),
        with("s3", None, Some("0b01"), &p.id),
        with("s4", None, None, &q.id),
        with("t1", Some("tp"), None, &p.id),
        with("t2", Some("tq"), None, &q.id),
        lease("old", None, None, 9_000),
    ] {
        store.insert_lease(l).await.unwrap();
    }
    let mut grants = store.live_grants(1_000, None).await.unwrap();
    grants.extend(
        store
            .live_grants(1_000, Some(vec!["tp".into(), "tq".into()]))
            .await
            .unwrap(),
    );
    grants.sort_by(|a, b| {
        (&a.principal, &a.task_id, a.kind.as_str()).cmp(&(
            &b.principal,
            &b.task_id,
            b.kind.as_str(),
        ))
    });
    let jwt_standalone = grants
        .iter()
        .find(|g| g.principal == p.id && g.task_id.is_none() && g.kind == LeaseKind::Jwt)
        .expect("p's standalone JWT-SVIDs are one grant")
        .clone();
    assert_eq!(jwt_standalone.leases, 2);
    assert_eq!(jwt_standalone.audience, ["aud"]);
    assert_eq!(jwt_standalone.expires_at, 9_000);
    assert_eq!(grants.len(), 5, "{grants:?}");

    // One event: p's standalone JWT-SVIDs and task tq (with its lease).
    let r = store
        .revoke_set(
            RevokeSet {
                tasks: vec!["tq".into()],
                grants: vec![jwt_standalone],
                signing_keys: Vec::new(),
                announce: false,
            },
            "policy",
            1_000,
        )
        .await
        .unwrap()
        .expect("something was live");
    assert!(r.event.is_set());
    assert_eq!(r.task_ids, ["tq"]);
    assert_eq!(r.leases, 3);
    let mut listed: Vec<String> = store
        .revoked_leases(&r.event)
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.id)
        .collect();
    listed.sort();
    assert_eq!(listed, ["s1", "s2", "t2"]);
    for (id, live) in [
        ("s1", false),
        ("s2", false),
        ("s3", true),
        ("s4", true),
        ("t1", true),
        ("t2", false),
    ] {
        assert_eq!(
            store.lease(id).await.unwrap().unwrap().active(1_000),
            live,
            "{id}"
        );
    }
    assert_eq!(
        store.task("tq").await.unwrap().unwrap().state,
        TaskState::Revoked
    );
    assert_eq!(
        store
            .task("tp")
            .await
            .unwrap()
            .unwrap()
            .principal
            .as_deref(),
        Some(p.id.as_str())
    );
    // Nothing left of that set: no event, unless announced.
    let empty = RevokeSet {
        tasks: vec!["tq".into()],
        ..RevokeSet::default()
    };
    assert_eq!(
        store
            .revoke_set(empty.clone(), "policy", 1_001)
            .await
            .unwrap(),
        None
    );
    let announced = store
        .revoke_set(
            RevokeSet {
                signing_keys: Vec::new(),
                announce: true,
                ..empty
            },
            "locked: x",
            1_001,
        )
        .await
        .unwrap()
        .expect("announced");
    assert_eq!((announced.task_ids.len(), announced.leases), (0, 0));
    assert!(
        store
            .revoked_leases(&announced.event)
            .await
            .unwrap()
            .is_empty()
    );

    // Locks.
    let lock = |id: &str, expires_at: Option<i64>| StoredLock {
        id: id.into(),
        target: "claim:repository=acme/api".into(),
        reason: "incident 42".into(),
        created_by: "admin".into(),
        created_at: 1_000,
        expires_at,
    };
    store.create_lock(lock("k1", None)).await.unwrap();
    store.create_lock(lock("k2", Some(2_000))).await.unwrap();
    assert!(matches!(
        store.create_lock(lock("k1", None)).await,
        Err(StoreError::Conflict | StoreError::Unavailable(_))
    ));
    assert_eq!(
        store.locks().await.unwrap(),
        [lock("k2", Some(2_000)), lock("k1", None)],
    );
    assert!(store.delete_lock("k1").await.unwrap());
    assert!(!store.delete_lock("k1").await.unwrap());

    // Pruning: expired locks, and principals nothing names once their leases are gone.
    store.prune(100_000).await.unwrap();
    assert!(store.locks().await.unwrap().is_empty());
    assert_eq!(
        store
            .principals(vec![p.id.clone(), q.id.clone()])
            .await
            .unwrap(),
        [p],
        "p is still named by the active task tp; q by nothing"
    );
}

/// Signing keys change only from the sequence they were read at; a revoked key's live leases
/// are revoked in one set event; live credentials are counted per key.
pub async fn signing_keys(store: std::sync::Arc<dyn Store>) {
    let (seq, keys) = store.signing_keys().await.unwrap();
    assert!(keys.is_empty());
    let key = |id: &str, kind: KeyKind, state: KeyState| StoredKey {
        id: id.into(),
        kind,
        state,
        public: vec![4, 1, 2, 3],
        wrapped: (kind != KeyKind::Root).then(|| vec![9; 40]),
        not_before: 100,
        not_after: 10_000,
        activate_at: 100,
        created_at: 100,
        changed_at: 100,
        note: Some("imported".into()),
    };
    let a = key("key-a", KeyKind::Jwt, KeyState::Active);
    let seq = store
        .change_keys(seq, vec![KeyOp::Put(a.clone())])
        .await
        .unwrap()
        .expect("first change applies");
    // A change from a stale sequence (another replica's race) writes nothing.
    let b = key("key-b", KeyKind::Jwt, KeyState::Prepared);
    assert_eq!(
        store
            .change_keys(seq - 1, vec![KeyOp::Put(b.clone())])
            .await
            .unwrap(),
        None
    );
    let (now_seq, keys) = store.signing_keys().await.unwrap();
    assert_eq!((now_seq, keys), (seq, vec![a.clone()]));
    // Several operations in one change: retire a, activate b, and the root.
    let mut retired = a.clone();
    retired.state = KeyState::Retired;
    let mut active_b = b.clone();
    active_b.state = KeyState::Active;
    let root = key("root", KeyKind::Root, KeyState::Active);
    let seq = store
        .change_keys(
            seq,
            vec![
                KeyOp::Put(retired.clone()),
                KeyOp::Put(active_b.clone()),
                KeyOp::Put(root.clone()),
            ],
        )
        .await
        .unwrap()
        .unwrap();
    let (_, keys) = store.signing_keys().await.unwrap();
    assert_eq!(keys.len(), 3);
    assert!(keys.contains(&retired) && keys.contains(&active_b) && keys.contains(&root));

    // Leases name their key; a revoked key revokes its live leases (and only those).
    store
        .insert_task(task("kt", "spiffe://e.org/a", 5_000, 5_000))
        .await
        .unwrap();
    for (id, task, k, exp) in [
        ("l1", Some("kt"), "key-a", 3_000),
        ("l2", None, "key-a", 3_000),
        ("l3", None, "key-a", 150),
        ("l4", None, "key-b", 3_000),
    ] {
        let mut l = lease(id, task, None, exp);
        l.signing_key = Some(k.into());
        store.insert_lease(l).await.unwrap();
    }
    let mut counts = store.live_by_signing_key(200).await.unwrap();
    counts.sort();
    assert_eq!(counts, vec![("key-a".into(), 2), ("key-b".into(), 1)]);
    let set = RevokeSet {
        signing_keys: vec!["key-a".into()],
        ..RevokeSet::default()
    };
    let r = store
        .revoke_set(set, "key revoked: leaked", 200)
        .await
        .unwrap()
        .expect("live leases were revoked");
    assert_eq!(r.leases, 2);
    assert!(r.event.is_set());
    let mut ids: Vec<String> = store
        .revoked_leases(&r.event)
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.id)
        .collect();
    ids.sort();
    assert_eq!(ids, vec!["l1", "l2"]);
    assert_eq!(
        store.live_by_signing_key(200).await.unwrap(),
        vec![("key-b".into(), 1)]
    );
    let lease = store.lease("l4").await.unwrap().unwrap();
    assert_eq!(lease.lease.signing_key.as_deref(), Some("key-b"));
    // Deleting a key.
    store
        .change_keys(seq, vec![KeyOp::Delete("key-a".into())])
        .await
        .unwrap()
        .unwrap();
    let (_, keys) = store.signing_keys().await.unwrap();
    assert!(keys.iter().all(|k| k.id != "key-a"));
}
