//! The serving side: what people and scrapers read. The CLI itself is `main.rs`.
//!
//! * [`metrics`]: the sync and datapath counters, served on `/metrics`;
//! * [`dump`]: `lb-user dump`, the maps as a person wants to read them;
//! * [`proxier_health`]: `/healthz` and `/livez`, the agent's own health (kube-proxy's
//!   proxier health server);
//! * [`service_health`]: healthCheckNodePort for services with
//!   `externalTrafficPolicy: Local` (kube-proxy's service health server);
//! * [`http`]: the HTTP server they share (hyper, with a connection cap and timeouts).

pub mod dump;
pub mod http;
pub mod metrics;
pub mod proxier_health;
pub mod service_health;
