//! The in-memory object store: objects by resource, namespace and name, one global resourceVersion
//! counter, and a bounded log of changes that watches replay from.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use serde_json::Value;
use tokio::sync::broadcast;

use crate::registry::Registry;

/// `(resource key, namespace, name)`; the namespace is `""` for cluster-scoped objects.
pub type Key = (String, String, String);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

/// One change, as stored: the object after it (for DELETED, the last state with the deletion's
/// resourceVersion) and before it, so a watch with a selector can tell objects entering and leaving.
#[derive(Debug)]
pub struct Event {
    pub rv: u64,
    pub key: String,
    pub namespace: String,
    pub kind: EventType,
    pub object: Value,
    pub prev: Option<Value>,
}

pub struct Inner {
    /// The last resourceVersion handed out; every write takes the next one.
    pub rv: u64,
    pub objects: BTreeMap<Key, Value>,
    /// Changes after `oldest_rv`, in order; a watch from an older version gets 410 Gone.
    pub log: VecDeque<Arc<Event>>,
    pub oldest_rv: u64,
    /// How many changes the log keeps (kube-apiserver's watch cache window).
    pub window: usize,
    pub tx: broadcast::Sender<Arc<Event>>,
    pub registry: Registry,
    /// Set by writes that the garbage collector must look at.
    pub gc_dirty: bool,
    /// Wakes the kubelet's loop of a pod (namespace, name) when that pod is written or removed,
    /// so a pod's life is followed by its changes instead of by polling every pod.
    pub pod_wakers: std::collections::HashMap<(String, String), Arc<tokio::sync::Notify>>,
}

impl Inner {
    pub fn new(window: usize) -> Self {
        let (tx, _) = broadcast::channel(65536);
        Inner {
            rv: 1,
            objects: BTreeMap::new(),
            log: VecDeque::new(),
            oldest_rv: 1,
            window,
            tx,
            registry: Registry::new(),
            gc_dirty: false,
            pod_wakers: std::collections::HashMap::new(),
        }
    }

    pub fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    pub fn get(&self, key: &str, ns: &str, name: &str) -> Option<&Value> {
        self.objects.get(&(key.to_string(), ns.to_string(), name.to_string()))
    }

    /// Objects of one resource, in one namespace or (`None`) in all, ordered by namespace and name.
    pub fn list(&self, key: &str, ns: Option<&str>) -> Vec<&Value> {
        let start = (key.to_string(), ns.unwrap_or("").to_string(), String::new());
        self.objects
            .range(start..)
            .take_while(|((k, n, _), _)| k == key && ns.is_none_or(|ns| ns == n))
            .map(|(_, v)| v)
            .collect()
    }

    /// Stores `obj` under a new resourceVersion and records the change; returns the stored object.
    pub fn put(&mut self, key: &str, ns: &str, mut obj: Value, kind: EventType) -> Value {
        let rv = self.next_rv();
        obj["metadata"]["resourceVersion"] = Value::String(rv.to_string());
        let name = obj["metadata"]["name"].as_str().unwrap_or_default().to_string();
        let prev = self.objects.insert((key.to_string(), ns.to_string(), name), obj.clone());
        self.record(Event { rv, key: key.into(), namespace: ns.into(), kind, object: obj.clone(), prev });
        obj
    }

    /// Removes an object; the DELETED event carries its last state under a new resourceVersion.
    pub fn remove(&mut self, key: &str, ns: &str, name: &str) -> Option<Value> {
        let mut obj = self.objects.remove(&(key.to_string(), ns.to_string(), name.to_string()))?;
        let prev = obj.clone();
        let rv = self.next_rv();
        obj["metadata"]["resourceVersion"] = Value::String(rv.to_string());
        self.gc_dirty = true;
        self.record(Event {
            rv,
            key: key.into(),
            namespace: ns.into(),
            kind: EventType::Deleted,
            object: obj.clone(),
            prev: Some(prev),
        });
        Some(obj)
    }

    /// The waker of pod `ns/name` (made on first use; dropped once the pod is gone).
    pub fn pod_waker(&mut self, ns: &str, name: &str) -> Arc<tokio::sync::Notify> {
        self.pod_wakers.entry((ns.to_string(), name.to_string())).or_default().clone()
    }

    fn record(&mut self, ev: Event) {
        if ev.key == "/pods" {
            let name = ev.object["metadata"]["name"].as_str().unwrap_or_default().to_string();
            let pod = (ev.namespace.clone(), name);
            let waker = match ev.kind {
                EventType::Deleted => self.pod_wakers.remove(&pod),
                _ => self.pod_wakers.get(&pod).cloned(),
            };
            if let Some(w) = waker {
                w.notify_waiters();
            }
        }
        let ev = Arc::new(ev);
        self.log.push_back(ev.clone());
        while self.log.len() > self.window {
            if let Some(old) = self.log.pop_front() {
                self.oldest_rv = old.rv;
            }
        }
        // No receiver is fine: nobody watches.
        let _ = self.tx.send(ev);
    }

    /// Forgets the change log, as an etcd compaction does: watches from older versions get 410.
    pub fn compact(&mut self) {
        self.log.clear();
        self.oldest_rv = self.rv;
    }
}
