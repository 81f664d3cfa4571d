//! Ephemera: a short-lived credential broker for services, CI jobs and agents.
//!
//! A caller proves what it is (attestation) on every request; identity mapping turns what was
//! proven into a SPIFFE ID; the broker clamps the lifetime and mints an X.509-SVID or JWT-SVID;
//! every decision is audited. Transports live at the edge (`api`, `http`); the core
//! (`broker`) and its parts (`attest`, `policy`, `ca`) are plain Rust.

pub mod api;
pub mod app;
pub mod attest;
pub mod broker;
pub mod ca;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod endpoints;
pub mod http;
pub mod id;
pub mod lease;
pub mod policy;
pub mod secret;
pub mod store;
