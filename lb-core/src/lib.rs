//! lb-core: the agent's pure parts, which build and test with stable Rust alone (no
//! eBPF toolchain, no root, no kernel):
//!
//! * [`model`]: kube-proxy's rules: Service, EndpointSlice and Node objects in, the
//!   desired frontends and backends out, kept up to date change by change;
//! * [`plan`]: [`plan::Programmed`], the diff of the desired state against what the maps
//!   hold, as ordered map operations;
//! * [`ops`]: those operations and [`ops::Snapshot`], the maps' contents as plain data;
//! * [`manifest`]: the manifest parser (YAML/JSON files and directories), with a fast
//!   reader for the plain subset of YAML that manifests are usually written in;
//! * [`maglev`]: Maglev lookup tables for the packet level's external traffic;
//! * [`seam`]: [`seam::Datapath`], what the agent needs of the kernel's maps, and
//!   [`seam::MemoryMaps`], an in-memory one with fault injection for tests.
//!
//! lb-user implements [`seam::Datapath`] over the pinned BPF maps and runs the loop.

pub mod maglev;
pub mod manifest;
pub mod model;
pub mod ops;
mod plain_yaml;
pub mod plan;
pub mod seam;
