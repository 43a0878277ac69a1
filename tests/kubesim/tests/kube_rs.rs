//! kube-rs against the emulator: a `kube::runtime::Controller` and a `watcher` with a reflector
//! keep working through watch restarts, including a restart that must relist (410 Gone).

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{
    conditions, reflector, wait::await_condition, watcher, Controller, WatchStreamExt,
};
use kube::{Client, Config, CustomResource, CustomResourceExt, Resource, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

use common::Sim;

/// A custom resource whose controller keeps one ConfigMap per Widget.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[kube(
    group = "example.kubesim.io",
    version = "v1",
    kind = "Widget",
    namespaced,
    status = "WidgetStatus",
    shortname = "wd"
)]
struct WidgetSpec {
    size: i64,
}

#[derive(Serialize, Deserialize, Clone, Debug, JsonSchema, Default)]
struct WidgetStatus {
    #[serde(rename = "observedGeneration")]
    observed_generation: Option<i64>,
    phase: Option<String>,
}

async fn client(sim: &Sim) -> Client {
    let kc = Kubeconfig::read_from(sim.kubeconfig()).unwrap();
    let cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap();
    Client::try_from(cfg).unwrap()
}

/// The emulator's test controls: end every open watch, or forget the change log.
fn control(sim: &Sim, what: &str) {
    let addr = sim.url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "POST /kubesim/{what} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
}

/// Polls `f` until it returns Some, for at most `secs` seconds.
async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    secs: u64,
    what: &str,
    mut f: impl FnMut() -> F,
) -> T {
    let end = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "{what}: not within {secs}s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Ctx {
    client: Client,
    recorder: Recorder,
    reconciles: AtomicUsize,
}

async fn reconcile(w: Arc<Widget>, ctx: Arc<Ctx>) -> Result<Action, kube::Error> {
    ctx.reconciles.fetch_add(1, Ordering::SeqCst);
    let ns = w.namespace().unwrap();
    let name = w.name_any();
    let owner = w.controller_owner_ref(&()).unwrap();
    let cm = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": format!("{name}-config"), "ownerReferences": [owner]},
        "data": {"size": w.spec.size.to_string()},
    });
    let pp = PatchParams::apply("widget-controller").force();
    Api::<ConfigMap>::namespaced(ctx.client.clone(), &ns)
        .patch(&format!("{name}-config"), &pp, &Patch::Apply(&cm))
        .await?;
    let status = json!({
        "apiVersion": "example.kubesim.io/v1", "kind": "Widget",
        "status": {"phase": "Reconciled", "observedGeneration": w.meta().generation},
    });
    Api::<Widget>::namespaced(ctx.client.clone(), &ns)
        .patch_status(&name, &pp, &Patch::Apply(&status))
        .await?;
    // An events.k8s.io/v1 Event (repeated ones become a series, patched).
    let ev = Event {
        type_: EventType::Normal,
        reason: "Reconciled".into(),
        note: Some(format!("size {}", w.spec.size)),
        action: "Reconcile".into(),
        secondary: None,
    };
    ctx.recorder.publish(&ev, &w.object_ref(&())).await?;
    Ok(Action::await_change())
}

fn error_policy(_: Arc<Widget>, _: &kube::Error, _: Arc<Ctx>) -> Action {
    Action::requeue(Duration::from_millis(200))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_survives_watch_restarts() {
    // No periodic bookmarks: a watch's resourceVersion stays where its last event left it.
    let sim = Sim::start_with(&["--bookmark-interval", "3600"]);
    let client = client(&sim).await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        "widgets.example.kubesim.io",
        &PatchParams::apply("test").force(),
        &Patch::Apply(Widget::crd()),
    )
    .await
    .unwrap();
    tokio::time::timeout(
        Duration::from_secs(10),
        await_condition(
            crds,
            "widgets.example.kubesim.io",
            conditions::is_crd_established(),
        ),
    )
    .await
    .expect("CRD established in time")
    .unwrap();

    let widgets: Api<Widget> = Api::namespaced(client.clone(), "default");
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let reporter = Reporter {
        controller: "widget-controller".into(),
        instance: Some("test".into()),
    };
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        recorder: Recorder::new(client.clone(), reporter),
        reconciles: AtomicUsize::new(0),
    });
    let controller = Controller::new(widgets.clone(), watcher::Config::default())
        .owns(cms.clone(), watcher::Config::default())
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|_| async {});
    let handle = tokio::spawn(controller);

    let reconciled = |name: &'static str, generation: i64| {
        let widgets = widgets.clone();
        let cms = cms.clone();
        async move {
            eventually(
                10,
                &format!("{name} reconciled at generation {generation}"),
                || {
                    let widgets = widgets.clone();
                    let cms = cms.clone();
                    async move {
                        let w = widgets.get(name).await.ok()?;
                        let st = w.status?;
                        let cm = cms.get(&format!("{name}-config")).await.ok()?;
                        (st.phase.as_deref() == Some("Reconciled")
                            && st.observed_generation == Some(generation))
                        .then_some(cm)
                    }
                },
            )
            .await
        }
    };

    let w = Widget::new("one", WidgetSpec { size: 1 });
    widgets.create(&PostParams::default(), &w).await.unwrap();
    let cm = reconciled("one", 1).await;
    assert_eq!(cm.data.unwrap()["size"], "1");
    assert_eq!(cm.metadata.owner_references.unwrap()[0].name, "one");

    // The server ends every watch: the controller re-watches from where it was.
    control(&sim, "close-watches");
    widgets
        .patch(
            "one",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"size": 2}})),
        )
        .await
        .unwrap();
    let cm = reconciled("one", 2).await;
    assert_eq!(cm.data.unwrap()["size"], "2");

    // A write the controller's watches do not see, then a compaction: re-watching gets 410 Gone
    // and the controller lists again.
    Api::<ConfigMap>::namespaced(client.clone(), "kube-system")
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "unrelated"}})).unwrap(),
        )
        .await
        .unwrap();
    control(&sim, "compact");
    control(&sim, "close-watches");
    widgets
        .create(
            &PostParams::default(),
            &Widget::new("two", WidgetSpec { size: 5 }),
        )
        .await
        .unwrap();
    let cm = reconciled("two", 1).await;
    assert_eq!(cm.data.unwrap()["size"], "5");

    // A child changed behind the controller's back is put right (owns() watches children).
    cms.patch(
        "two-config",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"size": "999"}})),
    )
    .await
    .unwrap();
    eventually(10, "child restored", || {
        let cms = cms.clone();
        async move { (cms.get("two-config").await.ok()?.data?["size"] == "5").then_some(()) }
    })
    .await;

    // Deleting the owner lets the garbage collector take its ConfigMap.
    widgets
        .delete("two", &DeleteParams::background())
        .await
        .unwrap();
    eventually(10, "owned ConfigMap collected", || {
        let cms = cms.clone();
        async move {
            cms.get_opt("two-config")
                .await
                .unwrap()
                .is_none()
                .then_some(())
        }
    })
    .await;
    assert!(ctx.reconciles.load(Ordering::SeqCst) >= 3);

    // The recorder's events are there through both APIs, as on a cluster.
    let core_events: Api<k8s_openapi::api::core::v1::Event> =
        Api::namespaced(client.clone(), "default");
    let lp = ListParams::default().fields("involvedObject.name=one,reason=Reconciled");
    let found = core_events.list(&lp).await.unwrap().items;
    assert!(!found.is_empty());
    assert_eq!(
        found[0].reporting_component.as_deref(),
        Some("widget-controller")
    );
    let new_events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(client.clone(), "default");
    let ours: Vec<_> = new_events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("one"))
        .collect();
    assert_eq!(ours.len(), 1, "{ours:?}");
    assert_eq!(ours[0].note.as_deref(), Some("size 1"));
    // The second reconcile's event was recorded as a series on the first (a merge patch).
    assert!(
        ours[0].series.as_ref().is_some_and(|s| s.count >= 2),
        "{:?}",
        ours[0]
    );
    handle.abort();
}

async fn reflector_case(streaming: bool) {
    // No periodic bookmarks: the watcher's resourceVersion stays where its last event left it.
    let sim = Sim::start_with(&["--bookmark-interval", "3600"]);
    let client = client(&sim).await;
    let nss: Api<Namespace> = Api::all(client.clone());
    nss.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "refl"}})).unwrap(),
    )
    .await
    .unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "refl");
    let mk = |name: &str| {
        serde_json::from_value::<ConfigMap>(
            json!({"metadata": {"name": name, "labels": {"set": "a"}}, "data": {"k": name}}),
        )
        .unwrap()
    };
    cms.create(&PostParams::default(), &mk("before"))
        .await
        .unwrap();

    let (reader, writer) = reflector::store::<ConfigMap>();
    let mut wc = watcher::Config::default().labels("set=a");
    if streaming {
        wc = wc.streaming_lists();
    }
    let inits = Arc::new(AtomicUsize::new(0));
    let inits2 = inits.clone();
    let stream = reflector(writer, watcher(cms.clone(), wc))
        .default_backoff()
        .for_each(move |ev| {
            if let Ok(watcher::Event::InitDone) = ev {
                inits2.fetch_add(1, Ordering::SeqCst);
            }
            async {}
        });
    let handle = tokio::spawn(stream);
    let names = |r: &reflector::Store<ConfigMap>| {
        r.state()
            .iter()
            .map(|c| c.name_any())
            .collect::<BTreeSet<_>>()
    };
    let want = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    reader.wait_until_ready().await.unwrap();
    assert_eq!(names(&reader), want(&["before"]));

    cms.create(&PostParams::default(), &mk("one"))
        .await
        .unwrap();
    eventually(10, "one seen", || async {
        (names(&reader) == want(&["before", "one"])).then_some(())
    })
    .await;

    control(&sim, "close-watches");
    cms.create(&PostParams::default(), &mk("two"))
        .await
        .unwrap();
    cms.delete("before", &DeleteParams::default())
        .await
        .unwrap();
    eventually(10, "changes after a restart", || async {
        (names(&reader) == want(&["one", "two"])).then_some(())
    })
    .await;

    // A write the watcher does not see, then a compaction: its resourceVersion is now too old,
    // re-watching gets 410 Gone and it must list again.
    Api::<ConfigMap>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &mk("elsewhere"))
        .await
        .unwrap();
    control(&sim, "compact");
    control(&sim, "close-watches");
    cms.create(&PostParams::default(), &mk("three"))
        .await
        .unwrap();
    // Leaving the label selector is a deletion for this watcher.
    cms.patch(
        "one",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"set": "b"}}})),
    )
    .await
    .unwrap();
    eventually(10, "changes after a 410 relist", || async {
        (names(&reader) == want(&["two", "three"])).then_some(())
    })
    .await;
    eventually(10, "a second initial list", || async {
        (inits.load(Ordering::SeqCst) >= 2).then_some(())
    })
    .await;

    let server: BTreeSet<String> = cms
        .list(&ListParams::default().labels("set=a"))
        .await
        .unwrap()
        .items
        .iter()
        .map(|c| c.name_any())
        .collect();
    assert_eq!(names(&reader), server);
    handle.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_reflector_list_watch_through_410() {
    reflector_case(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_reflector_streaming_list_through_410() {
    reflector_case(true).await;
}

/// kube-runtime's `finalizer` helper: its JSON patches (test + add, test + remove) and the
/// deletion it holds up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finalizer_helper_holds_deletion_until_cleanup() {
    use kube::runtime::finalizer::{finalizer, Event as Fin};
    let sim = Sim::start();
    let client = client(&sim).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let cm: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "held"}, "data": {"k": "v"}})).unwrap();
    cms.create(&PostParams::default(), &cm).await.unwrap();
    const NAME: &str = "kubesim.test/cleanup";
    let run = |obj: ConfigMap| {
        let cms = cms.clone();
        async move {
            finalizer(&cms, NAME, Arc::new(obj), |ev| async move {
                Ok::<_, kube::Error>(match ev {
                    Fin::Apply(_) => Action::await_change(),
                    Fin::Cleanup(_) => Action::await_change(),
                })
            })
            .await
        }
    };
    // First reconcile adds the finalizer (JSON patch: test that finalizers is null, then add).
    run(cms.get("held").await.unwrap()).await.unwrap();
    assert_eq!(
        cms.get("held").await.unwrap().finalizers(),
        [NAME.to_string()]
    );
    // A second one with the finalizer in place runs Apply and changes nothing.
    let before = cms.get("held").await.unwrap();
    run(before.clone()).await.unwrap();
    assert_eq!(
        cms.get("held").await.unwrap().resource_version(),
        before.resource_version()
    );
    // Deletion waits for the finalizer; cleanup removes it (test + remove) and the object goes.
    cms.delete("held", &DeleteParams::default()).await.unwrap();
    let deleting = cms.get("held").await.unwrap();
    assert!(deleting.metadata.deletion_timestamp.is_some());
    run(deleting).await.unwrap();
    assert!(cms.get_opt("held").await.unwrap().is_none());
}

/// The metadata-only API (`PartialObjectMetadata`): get, list and a metadata watcher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_api_and_metadata_watcher() {
    let sim = Sim::start();
    let client = client(&sim).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let cm: ConfigMap = serde_json::from_value(
        json!({"metadata": {"name": "m", "labels": {"a": "b"}}, "data": {"big": "x".repeat(1000)}}),
    )
    .unwrap();
    cms.create(&PostParams::default(), &cm).await.unwrap();
    let meta = cms.get_metadata("m").await.unwrap();
    assert_eq!(meta.metadata.labels.unwrap()["a"], "b");
    let list = cms
        .list_metadata(&ListParams::default().labels("a=b"))
        .await
        .unwrap();
    assert_eq!(
        list.items.iter().map(|m| m.name_any()).collect::<Vec<_>>(),
        vec!["m"]
    );
    let (reader, writer) = reflector::store();
    let metas: Api<kube::core::PartialObjectMeta<ConfigMap>> =
        Api::namespaced(client.clone(), "default");
    let stream = reflector(writer, watcher(metas, watcher::Config::default()))
        .default_backoff()
        .for_each(|_| async {});
    let handle = tokio::spawn(stream);
    reader.wait_until_ready().await.unwrap();
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "n"}})).unwrap(),
    )
    .await
    .unwrap();
    eventually(10, "metadata watcher sees n", || async {
        reader
            .state()
            .iter()
            .any(|m| m.name_any() == "n")
            .then_some(())
    })
    .await;
    handle.abort();
}
