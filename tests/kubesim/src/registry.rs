//! The kinds this server serves: the built-in ones and those that applied CRDs add.

use serde_json::{json, Value};

/// One served resource (a plural name in one API group), with what discovery says about it.
#[derive(Debug, Clone)]
pub struct ResourceType {
    /// API group, `""` for the core group.
    pub group: String,
    /// Served versions, the preferred (storage) one first.
    pub versions: Vec<String>,
    /// Plural resource name, as in URLs.
    pub resource: String,
    pub singular: String,
    pub kind: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    /// Has a `/status` subresource: the main resource ignores status and `/status` ignores the rest.
    pub status: bool,
    /// `metadata.generation` is kept and bumped when anything but metadata and status changes.
    pub generation: bool,
    /// A DELETE that removes the object at once answers with the object, not a `Status`.
    pub return_deleted_object: bool,
    /// PUT without `metadata.resourceVersion` is allowed (unconditional update).
    pub unconditional_update: bool,
    /// For custom resources: the CRD that defines it.
    pub crd: Option<Value>,
    /// Another resource whose objects this one serves (`events.k8s.io` events are core events).
    pub storage: Option<String>,
}

impl ResourceType {
    /// `pods`, or `agenttasks.agenttask.io`: how error messages name the resource.
    pub fn group_resource(&self) -> String {
        if self.group.is_empty() {
            self.resource.clone()
        } else {
            format!("{}.{}", self.resource, self.group)
        }
    }

    /// The key under which objects of this resource are stored (version independent).
    pub fn key(&self) -> String {
        match &self.storage {
            Some(k) => k.clone(),
            None => format!("{}/{}", self.group, self.resource),
        }
    }

    pub fn api_version(&self, version: &str) -> String {
        if self.group.is_empty() {
            version.to_string()
        } else {
            format!("{}/{version}", self.group)
        }
    }

    pub fn is_custom(&self) -> bool {
        self.crd.is_some()
    }

    /// The CRD's entry in `spec.versions` for `version`.
    pub fn crd_version(&self, version: &str) -> Option<&Value> {
        self.crd.as_ref()?["spec"]["versions"].as_array()?.iter().find(|v| v["name"] == version)
    }

    pub fn verbs(&self) -> Vec<&'static str> {
        vec!["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
    }
}

#[allow(clippy::too_many_arguments)]
fn builtin(
    group: &str,
    version: &str,
    resource: &str,
    singular: &str,
    kind: &str,
    namespaced: bool,
    short: &[&str],
    status: bool,
) -> ResourceType {
    ResourceType {
        group: group.into(),
        versions: vec![version.into()],
        resource: resource.into(),
        singular: singular.into(),
        kind: kind.into(),
        namespaced,
        short_names: short.iter().map(|s| s.to_string()).collect(),
        categories: vec![],
        status,
        generation: false,
        return_deleted_object: false,
        unconditional_update: true,
        crd: None,
        storage: None,
    }
}

/// The built-in kinds.
pub fn builtins() -> Vec<ResourceType> {
    let mut pods = builtin("", "v1", "pods", "pod", "Pod", true, &["po"], true);
    pods.categories = vec!["all".into()];
    pods.return_deleted_object = true;
    let mut netpol = builtin(
        "networking.k8s.io",
        "v1",
        "networkpolicies",
        "networkpolicy",
        "NetworkPolicy",
        true,
        &["netpol"],
        false,
    );
    netpol.generation = true;
    let mut crd = builtin(
        "apiextensions.k8s.io",
        "v1",
        "customresourcedefinitions",
        "customresourcedefinition",
        "CustomResourceDefinition",
        false,
        &["crd", "crds"],
        true,
    );
    crd.generation = true;
    crd.categories = vec!["api-extensions".into()];
    let mut events = builtin("events.k8s.io", "v1", "events", "event", "Event", true, &["ev"], false);
    events.storage = Some("/events".into());
    vec![
        builtin("", "v1", "namespaces", "namespace", "Namespace", false, &["ns"], true),
        pods,
        builtin("", "v1", "configmaps", "configmap", "ConfigMap", true, &["cm"], false),
        builtin(
            "",
            "v1",
            "persistentvolumeclaims",
            "persistentvolumeclaim",
            "PersistentVolumeClaim",
            true,
            &["pvc"],
            true,
        ),
        builtin("", "v1", "secrets", "secret", "Secret", true, &[], false),
        builtin("", "v1", "events", "event", "Event", true, &["ev"], false),
        events,
        builtin("", "v1", "serviceaccounts", "serviceaccount", "ServiceAccount", true, &["sa"], false),
        builtin("", "v1", "nodes", "node", "Node", false, &["no"], true),
        netpol,
        builtin("coordination.k8s.io", "v1", "leases", "lease", "Lease", true, &[], false),
        builtin("node.k8s.io", "v1", "runtimeclasses", "runtimeclass", "RuntimeClass", false, &[], false),
        crd,
    ]
}

/// The served resource a CRD object defines, if it is well formed.
pub fn from_crd(crd: &Value) -> Option<ResourceType> {
    let spec = &crd["spec"];
    let names = &spec["names"];
    let mut versions: Vec<String> = vec![];
    for v in spec["versions"].as_array()? {
        if v["served"].as_bool() == Some(true) {
            let name = v["name"].as_str()?.to_string();
            if v["storage"].as_bool() == Some(true) {
                versions.insert(0, name);
            } else {
                versions.push(name);
            }
        }
    }
    if versions.is_empty() {
        return None;
    }
    let kind = names["kind"].as_str()?.to_string();
    let plural = names["plural"].as_str()?.to_string();
    let status = spec["versions"].as_array()?.iter().any(|v| v["subresources"]["status"].is_object());
    let strs = |v: &Value| -> Vec<String> {
        v.as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect()).unwrap_or_default()
    };
    Some(ResourceType {
        group: spec["group"].as_str()?.to_string(),
        versions,
        singular: names["singular"].as_str().map(String::from).unwrap_or_else(|| kind.to_lowercase()),
        resource: plural,
        kind,
        namespaced: spec["scope"] == "Namespaced",
        short_names: strs(&names["shortNames"]),
        categories: strs(&names["categories"]),
        status,
        generation: true,
        return_deleted_object: true,
        unconditional_update: false,
        crd: Some(crd.clone()),
        storage: None,
    })
}

/// All served kinds; CRD-defined ones are replaced whenever their CRD changes.
#[derive(Debug, Clone)]
pub struct Registry {
    pub types: Vec<ResourceType>,
}

impl Registry {
    pub fn new() -> Self {
        Registry { types: builtins() }
    }

    pub fn find(&self, group: &str, version: &str, resource: &str) -> Option<&ResourceType> {
        self.types
            .iter()
            .find(|t| t.group == group && t.resource == resource && t.versions.iter().any(|v| v == version))
    }

    /// The resource that owns a storage key (not an alias such as `events.k8s.io` events).
    pub fn by_key(&self, key: &str) -> Option<&ResourceType> {
        self.types.iter().find(|t| t.key() == key && t.storage.is_none())
    }

    /// Adds or replaces the kind a CRD defines (or drops it when the CRD no longer serves any version).
    pub fn apply_crd(&mut self, crd: &Value) {
        let name = crd["metadata"]["name"].as_str().unwrap_or_default();
        self.remove_crd(name);
        if let Some(rt) = from_crd(crd) {
            self.types.push(rt);
        }
    }

    pub fn remove_crd(&mut self, crd_name: &str) {
        self.types.retain(|t| match &t.crd {
            Some(c) => c["metadata"]["name"] != crd_name,
            None => true,
        });
    }

    /// API groups with their versions, in the order discovery lists them (core excluded).
    pub fn groups(&self) -> Vec<(String, Vec<String>)> {
        let mut out: Vec<(String, Vec<String>)> = vec![];
        for t in &self.types {
            if t.group.is_empty() {
                continue;
            }
            match out.iter_mut().find(|(g, _)| *g == t.group) {
                Some((_, vs)) => {
                    for v in &t.versions {
                        if !vs.contains(v) {
                            vs.push(v.clone());
                        }
                    }
                }
                None => out.push((t.group.clone(), t.versions.clone())),
            }
        }
        out
    }

    /// `APIResourceList` for one group version.
    pub fn resource_list(&self, group: &str, version: &str) -> Option<Value> {
        let mut resources = vec![];
        for t in self.types.iter().filter(|t| t.group == group && t.versions.iter().any(|v| v == version)) {
            let mut r = json!({
                "name": t.resource,
                "singularName": t.singular,
                "namespaced": t.namespaced,
                "kind": t.kind,
                "verbs": t.verbs(),
            });
            if !t.short_names.is_empty() {
                r["shortNames"] = json!(t.short_names);
            }
            if !t.categories.is_empty() {
                r["categories"] = json!(t.categories);
            }
            resources.push(r);
            if t.status {
                resources.push(json!({
                    "name": format!("{}/status", t.resource),
                    "singularName": "",
                    "namespaced": t.namespaced,
                    "kind": t.kind,
                    "verbs": ["get", "patch", "update"],
                }));
            }
            if t.resource == "pods" {
                resources.push(json!({
                    "name": "pods/log", "singularName": "", "namespaced": true, "kind": "Pod", "verbs": ["get"],
                }));
            }
        }
        if resources.is_empty() {
            return None;
        }
        let gv = if group.is_empty() { version.to_string() } else { format!("{group}/{version}") };
        Some(json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}))
    }
}
