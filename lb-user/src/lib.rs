//! lb-user: the agent that programs the load balancer, and its CLI.
//!
//! Data flow, one module a step:
//!
//! * [`source`]: manifests or the Kubernetes API, both reporting [`model::Change`]s;
//! * [`model`]: pure, kube-proxy's rules: objects in, desired frontends and backends out;
//! * [`datapath`]: checks, loader, diff and ordered map writes: all the code that touches BPF;
//! * [`serve`]: metrics and `dump`, for people and scrapers;
//! * [`agent`]: the run loop that ties them together.

pub mod agent;
pub mod datapath;
pub use lb_core::model;
pub mod serve;
pub mod source;

/// An error and its causes on one line, each cause once: our error types already quote
/// their source in their message, and contexts added with anyhow do not.
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
    }
    msg
}

#[cfg(test)]
mod tests {
    #[test]
    fn error_chain_names_each_cause_once() {
        let io = std::io::Error::from_raw_os_error(libc::ENOENT);
        let e = anyhow::Error::from(crate::source::manifest::ManifestError::Io {
            path: "/nope".into(),
            source: io,
        })
        .context("starting");
        assert_eq!(
            super::error_chain(&e),
            "starting: manifests path /nope: No such file or directory (os error 2)"
        );
    }
}
