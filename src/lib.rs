//! Ephemera: a short-lived credential broker for services, CI jobs and agents.
//!
//! Every request: attest (`attest`) → map to a SPIFFE ID and authorize with Cedar (`policy`) →
//! clamp the lifetime → mint an X.509-SVID or JWT-SVID (`ca`) → record its lease durably
//! (`store`) → audit. Credentials belong to tasks; when a task ends, its leases stop being
//! honoured and the revocation is announced (`lease`) to the CRL, watch streams,
//! introspection and Workload API streams. Transports live at the edge (`api`, `http`); the
//! core (`broker`) and its parts are plain Rust.

pub mod api;
pub mod app;
pub mod attest;
pub mod broker;
pub mod ca;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod datadir;
pub mod dev;
pub mod endpoints;
pub mod http;
pub mod httpc;
pub mod id;
pub mod lease;
pub mod policy;
pub mod quota;
pub mod secret;
pub mod shutdown;
pub mod store;
pub mod telemetry;
