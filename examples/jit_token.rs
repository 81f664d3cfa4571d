//! A workload that gets just-in-time JWT-SVIDs from Ephemera with the library's client and
//! refreshes each at half its lifetime, checking every token as its relying party would (by
//! introspection).
//!
//! ```text
//! cargo run --example jit_token
//! ```
//!
//! It talks to the broker a running `ephemera dev` advertises in `.ephemera/` (or the one
//! `EPHEMERA_ADDR` / `EPHEMERA_DATA_DIR` name); with none, it starts an embedded broker in a
//! temporary directory. `EPHEMERA_EXAMPLE_ROUNDS` sets how many tokens to fetch (default 3).
#![allow(clippy::print_stdout, reason = "an example narrates what it does")]

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, ensure};
use ephemera::api::pb::v1::broker_client::BrokerClient;
use ephemera::api::pb::v1::revocations_client::RevocationsClient;
use ephemera::api::pb::v1::{IntrospectRequest, MintJwtSvidRequest};
use ephemera::client::ConnectOptions;
use ephemera::client::evidence::EvidenceOptions;
use ephemera::dev::DevOptions;

/// The service this workload calls with its tokens.
const AUDIENCE: &str = "inventory-api";
/// Short on purpose, so the example shows a few refreshes in seconds.
const TTL_SECS: u64 = 2;

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rounds: u32 = std::env::var("EPHEMERA_EXAMPLE_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);

    // A running broker if there is one; else our own.
    let mut connect = ConnectOptions {
        addr: std::env::var("EPHEMERA_ADDR").ok(),
        data_dir: std::env::var_os("EPHEMERA_DATA_DIR")
            .map_or_else(|| PathBuf::from(".ephemera"), PathBuf::from),
        ..ConnectOptions::default()
    };
    let mut evidence = EvidenceOptions::default();
    let mut embedded = None;
    if connect.resolve().is_err() {
        let dir = tempfile::tempdir().context("creating a temporary directory")?;
        let running = DevOptions::embedded(dir.path()).start().await?;
        println!("no broker running: started one in {}", dir.path().display());
        connect.socket = Some(running.endpoints.broker_socket.clone());
        // Our own broker knows only our uid on its socket: no CI evidence.
        evidence.ambient = false;
        embedded = Some((running, dir));
    }
    let channel = connect.connect().await?;
    let mut broker = BrokerClient::new(channel.clone());
    let mut relying_party = RevocationsClient::new(channel);

    let mut previous: Option<String> = None;
    for round in 1..=rounds {
        // Evidence is gathered for every call: CI and projected tokens rotate.
        let ev = evidence.resolve().await?;
        let svid = broker
            .mint_jwt_svid(ev.request(MintJwtSvidRequest {
                audience: vec![AUDIENCE.into()],
                ttl_seconds: Some(TTL_SECS),
                ..MintJwtSvidRequest::default()
            }))
            .await
            .context("minting a JWT-SVID")?
            .into_inner();
        ensure!(
            previous.as_deref() != Some(svid.jti.as_str()),
            "a refresh must give a new token"
        );

        // What the inventory API does with the bearer token it receives.
        let seen = relying_party
            .introspect(IntrospectRequest {
                token: svid.token.clone(),
            })
            .await?
            .into_inner();
        ensure!(seen.active, "a fresh token must be active");
        ensure!(seen.sub == svid.spiffe_id && seen.aud == [AUDIENCE]);

        let lifetime = svid.expires_at - unix_now();
        println!(
            "token {round}/{rounds}: {} for {AUDIENCE}, jti {}, expires in {lifetime}s; introspection: active",
            svid.spiffe_id, svid.jti
        );
        previous = Some(svid.jti);
        if round < rounds {
            // Refresh at half the lifetime, as SPIFFE workloads do.
            let wait = u64::try_from(lifetime / 2).unwrap_or(0).max(1);
            tokio::time::sleep(Duration::from_secs(wait)).await;
        }
    }
    if let Some((running, _dir)) = embedded {
        running.shutdown().await.map_err(anyhow::Error::msg)?;
    }
    println!("ok: {rounds} tokens fetched and refreshed");
    Ok(())
}
