//! An operator revoking a running task: a workload holds a JWT-SVID and an X.509-SVID in a task,
//! a relying party watches the revocation stream, and the admin — with the admin token — finds
//! the task and revokes it. Every relying-party channel learns of it: the watch stream carries
//! the event with both credentials, introspection refuses the token, and the CRL lists the
//! certificate's serial.
//!
//! ```text
//! cargo run --example admin_revoke
//! ```
//!
//! Runs against an embedded broker in a temporary directory; the same calls work against any
//! broker with `ephemera admin` (`tasks list`, `revoke task`).
#![allow(clippy::print_stdout, reason = "an example narrates what it does")]

use std::time::Duration;

use anyhow::{Context, ensure};
use ephemera::api::pb::v1::admin_client::AdminClient;
use ephemera::api::pb::v1::broker_client::BrokerClient;
use ephemera::api::pb::v1::revocations_client::RevocationsClient;
use ephemera::api::pb::v1::{
    BeginTaskRequest, IntrospectRequest, ListTasksRequest, MintJwtSvidRequest, MintX509SvidRequest,
    RevokeTaskRequest, WatchRequest,
};
use ephemera::client::ConnectOptions;
use ephemera::dev::DevOptions;

type AdminBearer = tonic::metadata::MetadataValue<tonic::metadata::Ascii>;

/// `msg` with the admin token.
fn as_admin<T>(bearer: &AdminBearer, msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert("authorization", bearer.clone());
    req
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir().context("creating a temporary directory")?;
    let running = DevOptions::embedded(dir.path()).start().await?;
    let endpoints = running.endpoints.clone();
    // The workload and the admin both use the local socket here; the admin is authorized by
    // its token, not by the socket.
    let channel = ConnectOptions {
        socket: Some(endpoints.broker_socket.clone()),
        ..ConnectOptions::default()
    }
    .connect()
    .await?;

    // A workload with a task and two credentials in it.
    let mut workload = BrokerClient::new(channel.clone());
    let task = workload
        .begin_task(BeginTaskRequest {
            labels: [("job".to_owned(), "nightly-backup".to_owned())].into(),
            ..BeginTaskRequest::default()
        })
        .await?
        .into_inner();
    let jwt = workload
        .mint_jwt_svid(MintJwtSvidRequest {
            audience: vec!["backup-store".into()],
            task_id: task.task_id.clone(),
            ..MintJwtSvidRequest::default()
        })
        .await?
        .into_inner();
    let x509 = workload
        .mint_x509_svid(MintX509SvidRequest {
            task_id: task.task_id.clone(),
            ..MintX509SvidRequest::default()
        })
        .await?
        .into_inner();
    println!(
        "workload {}: task {} with JWT-SVID {} and X.509-SVID serial {}",
        task.spiffe_id, task.task_id, jwt.jti, x509.serial
    );

    // A relying party subscribes before anything happens.
    let mut relying_party = RevocationsClient::new(channel.clone());
    let mut events = relying_party
        .watch(WatchRequest { cursor: None })
        .await?
        .into_inner();

    // The admin: token from the data directory, as `ephemera admin` reads it.
    let token = std::fs::read_to_string(
        endpoints
            .admin_token_file
            .clone()
            .context("the broker advertises no admin token file")?,
    )?;
    let bearer: AdminBearer = format!("Bearer {}", token.trim()).parse()?;
    let mut admin = AdminClient::new(channel);
    let listed = admin
        .list_tasks(as_admin(
            &bearer,
            ListTasksRequest {
                state: "active".into(),
                ..ListTasksRequest::default()
            },
        ))
        .await?
        .into_inner();
    let found = listed
        .tasks
        .iter()
        .find(|t| t.labels.get("job").map(String::as_str) == Some("nightly-backup"))
        .context("the admin sees the task")?;
    println!(
        "admin: found active task {} of {}",
        found.id, found.spiffe_id
    );
    let revoked = admin
        .revoke_task(as_admin(
            &bearer,
            RevokeTaskRequest {
                task_id: found.id.clone(),
            },
        ))
        .await?
        .into_inner();
    ensure!(!revoked.already_revoked);
    println!("admin: revoked task {}", found.id);

    // 1. The watch stream delivers the event with both credentials.
    let event = tokio::time::timeout(Duration::from_secs(5), events.message())
        .await
        .context("no revocation event within 5s")??
        .context("watch stream ended")?;
    ensure!(event.task_id == task.task_id);
    ensure!(event.credentials.iter().any(|c| c.jti == jwt.jti));
    ensure!(event.credentials.iter().any(|c| c.serial == x509.serial));
    println!(
        "watcher: event {} \"{}\" with {} credential(s)",
        event.cursor,
        event.reason,
        event.credentials.len()
    );

    // 2. Introspection refuses the token.
    let seen = relying_party
        .introspect(IntrospectRequest { token: jwt.token })
        .await?
        .into_inner();
    ensure!(!seen.active, "a revoked token must be inactive");
    println!("introspection: JWT-SVID active = false");

    // 3. The CRL lists the serial (it is re-signed right after the revocation).
    let crl_url = format!("{}/crl", endpoints.http_addr);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let der = ephemera::httpc::get(&crl_url, None, &[], 1 << 20)
            .await
            .map_err(anyhow::Error::msg)?;
        let (_, crl) = x509_parser::parse_x509_crl(&der).context("parsing the CRL")?;
        let listed = crl.iter_revoked_certificates().any(|r| {
            r.raw_serial()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
                == x509.serial
        });
        if listed {
            println!("CRL: serial {} is listed", x509.serial);
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "serial not in the CRL within 5s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    running.shutdown().await.map_err(anyhow::Error::msg)?;
    println!("ok: one admin call took back every credential of the task");
    Ok(())
}
