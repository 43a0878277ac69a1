//! The controllers deletion depends on: the garbage collector (ownerReferences with Background,
//! Foreground and Orphan propagation), the namespace controller (emptying a Terminating namespace)
//! and the CRD cleanup (a deleted CRD takes its objects with it).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::api::App;
use crate::objects::{self, DeleteOpts, WriteCtx};
use crate::store::{Inner, Key};

/// Runs the controllers whenever a write asks for it, and every 100 ms while work is pending.
/// A pass looks at every object, so passes are at least [`MIN_GAP`] apart: the writes of a busy
/// moment are taken together (as the real garbage collector works from a queue, eventually)
/// instead of costing a full pass each.
pub async fn run(app: Arc<App>) {
    let mut pending = false;
    loop {
        tokio::time::sleep(MIN_GAP).await;
        if pending {
            tokio::select! {
                _ = app.gc_wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        } else {
            app.gc_wake.notified().await;
        }
        let mut inner = app.lock();
        inner.gc_dirty = false;
        pending = pass(&mut inner);
        // A pass's own writes (deletions that cascade) are looked at by the next pass.
        if inner.gc_dirty {
            pending = true;
        }
        inner.gc_dirty = false;
    }
}

/// The least time between two passes.
const MIN_GAP: Duration = Duration::from_millis(50);

enum Action {
    Delete(Key, Option<&'static str>),
    DropOwner(Key, Vec<String>),
    DropFinalizer(Key, &'static str),
    RemoveNamespace(String),
}

fn uid(o: &Value) -> &str {
    o["metadata"]["uid"].as_str().unwrap_or_default()
}

fn has_finalizer(o: &Value, f: &str) -> bool {
    o["metadata"]["finalizers"].as_array().is_some_and(|a| a.iter().any(|x| x == f))
}

fn deleting(o: &Value) -> bool {
    !o["metadata"]["deletionTimestamp"].is_null()
}

fn owner_uids(o: &Value) -> Vec<(String, bool)> {
    o["metadata"]["ownerReferences"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| (r["uid"].as_str().unwrap_or_default().to_string(), r["blockOwnerDeletion"] == true))
        .collect()
}

/// One pass over all objects; returns whether work is still pending (waiting on dependents).
fn pass(inner: &mut Inner) -> bool {
    let uids: HashSet<String> = inner.objects.values().map(|o| uid(o).to_string()).collect();
    let mut dependents: HashMap<String, Vec<(Key, bool, bool)>> = HashMap::new();
    for (k, o) in &inner.objects {
        for (owner, block) in owner_uids(o) {
            dependents.entry(owner).or_default().push((k.clone(), block, deleting(o)));
        }
    }
    let mut actions = vec![];
    let mut pending = false;
    for (k, o) in &inner.objects {
        let owners = owner_uids(o);
        if !owners.is_empty() && !deleting(o) {
            let absent: Vec<String> =
                owners.iter().filter(|(u, _)| !uids.contains(u)).map(|(u, _)| u.clone()).collect();
            if absent.len() == owners.len() {
                actions.push(Action::Delete(k.clone(), None));
            } else if !absent.is_empty() {
                actions.push(Action::DropOwner(k.clone(), absent));
            }
        }
        if !deleting(o) {
            continue;
        }
        let deps = dependents.get(uid(o)).cloned().unwrap_or_default();
        if has_finalizer(o, "orphan") {
            for (dk, _, _) in &deps {
                actions.push(Action::DropOwner(dk.clone(), vec![uid(o).to_string()]));
            }
            actions.push(Action::DropFinalizer(k.clone(), "orphan"));
        }
        if has_finalizer(o, "foregroundDeletion") {
            for (dk, block, dep_deleting) in &deps {
                if !dep_deleting {
                    actions.push(Action::Delete(dk.clone(), if *block { Some("Foreground") } else { None }));
                }
            }
            if deps.iter().any(|(_, block, _)| *block) {
                pending = true;
            } else {
                actions.push(Action::DropFinalizer(k.clone(), "foregroundDeletion"));
            }
        }
        if k.0 == "/namespaces" {
            let ns = k.2.clone();
            let content: Vec<Key> = inner.objects.keys().filter(|(_, n, _)| *n == ns).cloned().collect();
            if content.is_empty() {
                actions.push(Action::RemoveNamespace(ns));
            } else {
                pending = true;
                for c in content {
                    if !deleting(&inner.objects[&c]) {
                        actions.push(Action::Delete(c, None));
                    }
                }
            }
        }
        if k.0 == "apiextensions.k8s.io/customresourcedefinitions"
            && has_finalizer(o, "customresourcecleanup.apiextensions.k8s.io")
        {
            let key = format!(
                "{}/{}",
                o["spec"]["group"].as_str().unwrap_or_default(),
                o["spec"]["names"]["plural"].as_str().unwrap_or_default()
            );
            let content: Vec<Key> = inner.objects.keys().filter(|(kk, _, _)| *kk == key).cloned().collect();
            if content.is_empty() {
                actions.push(Action::DropFinalizer(k.clone(), "customresourcecleanup.apiextensions.k8s.io"));
            } else {
                pending = true;
                for c in content {
                    if !deleting(&inner.objects[&c]) {
                        actions.push(Action::Delete(c, None));
                    }
                }
            }
        }
        if k.0 == "/pods" {
            // The kubelet finishes graceful pod deletions; keep looking until it has.
            pending = true;
        }
    }
    for a in actions {
        run_action(inner, a);
    }
    pending
}

fn run_action(inner: &mut Inner, a: Action) {
    let ctx = WriteCtx::internal("generic-garbage-collector");
    match a {
        Action::Delete((key, ns, name), policy) => {
            let Some(rt) = inner.registry.by_key(&key).cloned() else {
                return;
            };
            let opts = DeleteOpts { propagation: policy.map(String::from), ..Default::default() };
            let _ = objects::delete(inner, &rt, &ns, &name, &opts, &ctx);
        }
        Action::DropOwner(k, gone) => modify(inner, &k, |o| {
            let refs: Vec<Value> = o["metadata"]["ownerReferences"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|r| !gone.iter().any(|g| r["uid"] == g.as_str()))
                .cloned()
                .collect();
            if refs.is_empty() {
                o["metadata"].as_object_mut().unwrap().remove("ownerReferences");
            } else {
                o["metadata"]["ownerReferences"] = Value::Array(refs);
            }
        }),
        Action::DropFinalizer(k, f) => modify(inner, &k, |o| {
            let fins: Vec<Value> =
                o["metadata"]["finalizers"].as_array().into_iter().flatten().filter(|x| *x != f).cloned().collect();
            if fins.is_empty() {
                o["metadata"].as_object_mut().unwrap().remove("finalizers");
            } else {
                o["metadata"]["finalizers"] = json!(fins);
            }
        }),
        Action::RemoveNamespace(ns) => {
            if inner.get("/namespaces", "", &ns).is_some() {
                inner.remove("/namespaces", "", &ns);
            }
        }
    }
}

fn modify(inner: &mut Inner, k: &Key, f: impl FnOnce(&mut Value)) {
    let Some(rt) = inner.registry.by_key(&k.0).cloned() else {
        return;
    };
    let Some(mut o) = inner.objects.get(k).cloned() else {
        return;
    };
    f(&mut o);
    let version = o["apiVersion"].as_str().and_then(|a| a.rsplit('/').next()).unwrap_or(&rt.versions[0]).to_string();
    let mut ctx = WriteCtx::internal("generic-garbage-collector");
    let _ = objects::update(inner, &rt, &version, &k.1, &k.2, o, None, &mut ctx, false);
}
