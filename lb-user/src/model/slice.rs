//! The EndpointSlice as the agent holds it: the fields kube-proxy reads and nothing else.
//!
//! EndpointSlices are most of a cluster's objects and most of their size: k8s-openapi's
//! type spends 350 bytes on each endpoint before any of its strings (targetRef,
//! hostname, deprecatedTopology...), which the data path never uses. This type reads the
//! same JSON and YAML (the API's field names; unknown fields are skipped while parsing,
//! never stored) and is what the sources, the watch included, deserialize into.

use std::borrow::Cow;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

/// `discovery.k8s.io/v1` EndpointSlice, the fields kube-proxy reads.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Slice {
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub address_type: String,
    pub endpoints: Vec<SliceEndpoint>,
    #[serde(default)]
    pub ports: Option<Vec<SlicePort>>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SlicePort {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub port: Option<i32>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SliceEndpoint {
    pub addresses: Vec<String>,
    #[serde(default)]
    pub conditions: Option<Conditions>,
    #[serde(default)]
    pub node_name: Option<String>,
    /// Boxed: most endpoints have none.
    #[serde(default)]
    pub hints: Option<Box<Hints>>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Conditions {
    #[serde(default)]
    pub ready: Option<bool>,
    #[serde(default)]
    pub serving: Option<bool>,
    #[serde(default)]
    pub terminating: Option<bool>,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Hints {
    #[serde(default)]
    pub for_zones: Option<Vec<Named>>,
    #[serde(default)]
    pub for_nodes: Option<Vec<Named>>,
}

/// `{name: ...}`, as zone and node hints are written.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct Named {
    pub name: String,
}

impl Slice {
    /// Drops the metadata the model never reads (see [`slim_meta`]).
    pub fn slim(mut self) -> Self {
        slim_meta(&mut self.metadata);
        self
    }
}

/// Keeps of an object's metadata what the model reads: name, namespace, labels,
/// annotations (but kubectl's copy of the whole object), resourceVersion and uid.
pub fn slim_meta(meta: &mut ObjectMeta) {
    let m = std::mem::take(meta);
    let mut annotations = m.annotations;
    if let Some(a) = &mut annotations {
        a.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
    *meta = ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        labels: m.labels,
        annotations,
        resource_version: m.resource_version,
        uid: m.uid,
        ..ObjectMeta::default()
    };
}

impl kube::Resource for Slice {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "EndpointSlice".into()
    }

    fn group(_: &()) -> Cow<'_, str> {
        "discovery.k8s.io".into()
    }

    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }

    fn plural(_: &()) -> Cow<'_, str> {
        "endpointslices".into()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_the_api_sends_and_skips_the_rest() {
        let json = r#"{"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice",
            "metadata":{"name":"web-abc","namespace":"shop","labels":{"kubernetes.io/service-name":"web"},
              "ownerReferences":[{"apiVersion":"v1","kind":"Service","name":"web","uid":"u"}],
              "resourceVersion":"42","uid":"s-1"},
            "addressType":"IPv4",
            "endpoints":[{"addresses":["10.244.1.2"],"conditions":{"ready":true,"serving":true,"terminating":false},
              "hostname":"h","nodeName":"node-a","zone":"z1","hints":{"forZones":[{"name":"z1"}],"forNodes":[{"name":"node-a"}]},
              "targetRef":{"kind":"Pod","name":"web-1","namespace":"shop","uid":"p"}}],
            "ports":[{"name":"http","port":8080,"protocol":"TCP","appProtocol":"http"}]}"#;
        let s: Slice = serde_json::from_str(json).unwrap();
        let s = s.slim();
        assert_eq!(s.metadata.name.as_deref(), Some("web-abc"));
        assert!(s.metadata.owner_references.is_none(), "slimmed");
        assert_eq!(s.metadata.resource_version.as_deref(), Some("42"));
        assert_eq!(s.address_type, "IPv4");
        let ep = &s.endpoints[0];
        assert_eq!(ep.addresses, ["10.244.1.2"]);
        assert_eq!(ep.node_name.as_deref(), Some("node-a"));
        let hints = ep.hints.as_ref().unwrap();
        assert_eq!(hints.for_zones.as_ref().unwrap()[0].name, "z1");
        assert_eq!(hints.for_nodes.as_ref().unwrap()[0].name, "node-a");
        assert_eq!(ep.conditions.as_ref().unwrap().ready, Some(true));
        let p = &s.ports.as_ref().unwrap()[0];
        assert_eq!((p.name.as_deref(), p.port), (Some("http"), Some(8080)));
        // The required fields are required, as the API's schema has them.
        assert!(serde_json::from_str::<Slice>(r#"{"endpoints":[]}"#).is_err());
        assert!(std::mem::size_of::<SliceEndpoint>() <= 64);
    }
}
