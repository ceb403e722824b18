//! The serving side: what people and scrapers read. The CLI itself is `main.rs`.
//!
//! * [`metrics`]: the sync and datapath counters, served on `/metrics`;
//! * [`dump`]: `lb-user dump`, the maps as a person wants to read them;
//! * [`health`]: healthCheckNodePort for services with `externalTrafficPolicy: Local`;
//! * [`http`]: the HTTP server they share (hyper, with a connection cap and timeouts).

pub mod dump;
pub mod health;
pub mod healthz;
pub mod http;
pub mod metrics;
