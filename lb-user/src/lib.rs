//! lb-user: the agent that programs the socket-level load balancer, and its CLI.
//!
//! Data flow: [`manifest`] (source) -> [`model`] (pure desired state) -> [`datapath`]
//! (diff and ordered map writes) -> the pinned maps read by lb-ebpf's programs.

pub mod agent;
pub mod datapath;
pub mod dump;
pub mod lab;
pub mod loader;
pub mod manifest;
pub mod model;
