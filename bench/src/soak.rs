//! Part 4: a soak of mixed load against a broker process, watching memory and descriptors.

use crate::*;

/// Lifetime of the soak's credentials. Revoked certificates stay in the CRL until they expire,
/// so the CRL (and the memory it takes) reaches its steady size after one lifetime; a short one
/// lets a ten-minute soak show the steady state a broker reaches after its longest TTL.
pub(crate) const SOAK_TTL_SECS: u64 = 120;

pub(crate) async fn soak(seconds: f64, store_url: Option<&str>) -> anyhow::Result<Value> {
    let (child, endpoints, admin_token, _dir) = broker_process(store_url).await?;
    let pid = child.child.id();
    let connect = ConnectOptions {
        socket: Some(endpoints.broker_socket.clone()),
        ..ConnectOptions::default()
    };
    let channel = || connect.connect();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut workers = Vec::new();
    // Task lifecycles: begin, keep alive, mint both kinds, end.
    for _ in 0..16 {
        let mut c = BrokerClient::new(channel().await?);
        let (stop, done, errors) = (stop.clone(), done.clone(), errors.clone());
        workers.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r: anyhow::Result<()> = async {
                    let task = c
                        .begin_task(BeginTaskRequest::default())
                        .await?
                        .into_inner();
                    let (tx, rx) = tokio::sync::mpsc::channel(2);
                    tx.send(KeepAliveRequest {
                        task_id: task.task_id.clone(),
                    })
                    .await?;
                    let mut ka = c
                        .keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
                        .await?
                        .into_inner();
                    ka.message().await?;
                    for _ in 0..3 {
                        c.mint_jwt_svid(MintJwtSvidRequest {
                            audience: vec!["soak".into()],
                            task_id: task.task_id.clone(),
                            ttl_seconds: Some(SOAK_TTL_SECS),
                            ..MintJwtSvidRequest::default()
                        })
                        .await?;
                        c.mint_x509_svid(MintX509SvidRequest {
                            task_id: task.task_id.clone(),
                            ttl_seconds: Some(SOAK_TTL_SECS),
                            ..MintX509SvidRequest::default()
                        })
                        .await?;
                        tx.send(KeepAliveRequest::default()).await?;
                    }
                    c.end_task(EndTaskRequest {
                        task_id: task.task_id,
                    })
                    .await?;
                    Ok(())
                }
                .await;
                match r {
                    Ok(()) => done.fetch_add(6, std::sync::atomic::Ordering::Relaxed),
                    Err(_) => errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                };
            }
        }));
    }
    // Watchers that stay, and watchers that come and go.
    for i in 0..4 {
        let mut r = RevocationsClient::new(channel().await?);
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok(s) = r.watch(WatchRequest { cursor: None }).await else {
                    continue;
                };
                let mut s = s.into_inner();
                let until = Instant::now() + Duration::from_secs(if i == 0 { 3600 } else { 5 });
                while Instant::now() < until && !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if tokio::time::timeout(Duration::from_secs(1), s.message())
                        .await
                        .is_ok_and(|m| m.is_err())
                    {
                        break;
                    }
                }
            }
        }));
    }
    // An admin listing every second.
    {
        let mut admin = AdminClient::new(channel().await?);
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut req = tonic::Request::new(ListLeasesRequest {
                    page_size: 100,
                    ..ListLeasesRequest::default()
                });
                if let Ok(v) = format!("Bearer {admin_token}").parse() {
                    req.metadata_mut().insert("authorization", v);
                }
                let _ = admin.list_leases(req).await;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }));
    }
    let started = Instant::now();
    let every = (seconds / 20.0).max(0.5);
    let mut samples = Vec::new();
    while started.elapsed().as_secs_f64() < seconds {
        tokio::time::sleep(Duration::from_secs_f64(every)).await;
        let (rss, _) = rss_mib(pid);
        samples.push(json!({
            "t_s": (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
            "rss_mib": (rss * 10.0).round() / 10.0,
            "open_fds": open_fds(pid),
            "credentials": done.load(std::sync::atomic::Ordering::Relaxed),
        }));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in workers {
        w.abort();
    }
    let first = samples
        .get(samples.len().min(2).saturating_sub(1))
        .cloned()
        .unwrap_or_default();
    let last = samples.last().cloned().unwrap_or_default();
    Ok(json!({
        "seconds": seconds,
        "credential_ttl_s": SOAK_TTL_SECS,
        "samples": samples,
        "errors": errors.load(std::sync::atomic::Ordering::Relaxed),
        "rss_growth_mib": ((last["rss_mib"].as_f64().unwrap_or(0.0) - first["rss_mib"].as_f64().unwrap_or(0.0)) * 10.0).round() / 10.0,
        "fd_growth": last["open_fds"].as_i64().unwrap_or(0) - first["open_fds"].as_i64().unwrap_or(0),
    }))
}
