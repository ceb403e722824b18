//! lb-user: the agent that programs the socket-level load balancer, and its CLI.
//!
//! Data flow: [`manifest`] (source) -> [`model`] (pure desired state) -> [`datapath`]
//! (diff and ordered map writes) -> the pinned maps read by lb-ebpf's programs.

pub mod agent;
pub mod bench;
pub mod bench_rules;
pub mod datapath;
pub mod dump;
pub mod kube_source;
pub mod lab;
pub mod loader;
pub mod manifest;
pub mod metrics;
pub mod model;

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
        let e = anyhow::Error::from(crate::manifest::ManifestError::Io {
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
