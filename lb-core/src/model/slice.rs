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
    /// Name, namespace, resourceVersion and uid (see [`Slice::slim`]).
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// The `kubernetes.io/service-name` label and the last-change-trigger-time
    /// annotation, taken out of the metadata by [`Slice::slim`].
    #[serde(skip)]
    pub service_name: Option<String>,
    #[serde(skip)]
    pub trigger_time: Option<String>,
    /// Labelled for another proxy or as a headless service's ([`super::not_ours`]),
    /// recorded by [`Slice::slim`].
    #[serde(skip)]
    pub not_ours: bool,
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
    /// `addresses[0]`, the one kube-proxy uses (the API allows one only).
    #[serde(rename = "addresses", deserialize_with = "first_address")]
    pub address: Option<String>,
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
    /// Keeps of the metadata the name, namespace, resourceVersion and uid, and the two
    /// values the model reads of its labels and annotations (as fields); frees the
    /// endpoint list's spare room.
    pub fn slim(mut self) -> Self {
        let labels = self.metadata.labels.take();
        let annotations = self.metadata.annotations.take();
        self.not_ours |= super::not_ours(labels.as_ref());
        self.service_name = self
            .service_name
            .take()
            .or_else(|| labels.and_then(|mut l| l.remove(super::SERVICE_NAME_LABEL)));
        self.trigger_time = self
            .trigger_time
            .take()
            .or_else(|| annotations.and_then(|mut a| a.remove(super::TRIGGER_TIME_ANNOTATION)));
        slim_meta(&mut self.metadata);
        self.endpoints.shrink_to_fit();
        self
    }

    /// Labelled for another proxy or as a headless service's.
    pub fn is_not_ours(&self) -> bool {
        self.not_ours || super::not_ours(self.metadata.labels.as_ref())
    }

    /// The service this slice belongs to (its `kubernetes.io/service-name` label).
    pub fn service_name(&self) -> Option<&str> {
        self.service_name.as_deref().or_else(|| {
            let labels = self.metadata.labels.as_ref()?;
            labels.get(super::SERVICE_NAME_LABEL).map(String::as_str)
        })
    }

    /// Its `endpoints.kubernetes.io/last-change-trigger-time` annotation.
    pub fn trigger_time(&self) -> Option<&str> {
        self.trigger_time.as_deref().or_else(|| {
            let annotations = self.metadata.annotations.as_ref()?;
            annotations
                .get(super::TRIGGER_TIME_ANNOTATION)
                .map(String::as_str)
        })
    }
}

/// The first element of a list of strings, the others skipped unstored.
fn first_address<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    struct First;
    impl<'de> serde::de::Visitor<'de> for First {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a list of addresses")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let first = seq.next_element::<String>()?;
            while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
            Ok(first)
        }
    }
    d.deserialize_seq(First)
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
        // Ranks two Services' claims on one frontend.
        creation_timestamp: m.creation_timestamp,
        ..ObjectMeta::default()
    };
}

impl kube_core::Resource for Slice {
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
        assert!(s.metadata.labels.is_none(), "kept as a field");
        assert_eq!(s.service_name(), Some("web"));
        assert_eq!(s.metadata.resource_version.as_deref(), Some("42"));
        assert_eq!(s.address_type, "IPv4");
        let ep = &s.endpoints[0];
        assert_eq!(ep.address.as_deref(), Some("10.244.1.2"));
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
