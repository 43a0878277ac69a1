//! The node: a scheduler that binds every pod to `kubesim-node`, and the `simulate` kubelet that
//! plays each pod's life from annotations, plus container logs and the pod `log` subresource.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc, Notify};

use crate::api::App;
use crate::errors::{ApiError, ApiResult};
use crate::objects::{self, DeleteOpts, WriteCtx};
use crate::store::EventType;

pub const NODE: &str = "kubesim-node";
/// Annotation prefix of the simulation controls (see the crate docs).
pub const ANN: &str = "kubesim.agenttask.io/";

/// Container logs, by pod uid and container name.
#[derive(Default)]
pub struct Logs {
    bufs: Mutex<HashMap<(String, String), LogBuf>>,
    changed: Notify,
}

#[derive(Default, Clone)]
struct LogBuf {
    lines: Vec<(DateTime<Utc>, String)>,
    done: bool,
}

impl Logs {
    /// Appends `text` (split into lines, each keeping its newline) to a container's log.
    pub fn write(&self, uid: &str, container: &str, text: &str) {
        let mut bufs = self.bufs.lock().unwrap();
        let b = bufs.entry((uid.into(), container.into())).or_default();
        for line in text.split_inclusive('\n') {
            b.lines.push((Utc::now(), line.to_string()));
        }
        drop(bufs);
        self.changed.notify_waiters();
    }

    /// Marks a container's log as complete: followers stop.
    pub fn finish(&self, uid: &str, container: &str) {
        self.bufs.lock().unwrap().entry((uid.into(), container.into())).or_default().done = true;
        self.changed.notify_waiters();
    }

    pub fn forget(&self, uid: &str) {
        self.bufs.lock().unwrap().retain(|(u, _), _| u != uid);
        self.changed.notify_waiters();
    }

    fn snapshot(&self, uid: &str, container: &str) -> LogBuf {
        self.bufs.lock().unwrap().get(&(uid.to_string(), container.to_string())).cloned().unwrap_or_default()
    }

    /// The last lines of a log, at most `max` bytes (a termination message fallback).
    pub fn tail(&self, uid: &str, container: &str, lines: usize, max: usize) -> String {
        let b = self.snapshot(uid, container);
        let start = b.lines.len().saturating_sub(lines);
        let s: String = b.lines[start..].iter().map(|(_, l)| l.as_str()).collect();
        if s.len() > max {
            let mut cut = s.len() - max;
            while !s.is_char_boundary(cut) {
                cut += 1;
            }
            s[cut..].to_string()
        } else {
            s
        }
    }
}

fn pod_rt(app: &App) -> crate::registry::ResourceType {
    app.lock().registry.find("", "v1", "pods").cloned().expect("pods are built in")
}

/// `GET .../pods/NAME/log`: `container`, `follow`, `tailLines`, `limitBytes`, `timestamps`,
/// `sinceSeconds`, `sinceTime`, `previous`.
pub async fn serve_log(app: &Arc<App>, ns: &str, name: &str, q: &HashMap<String, String>) -> ApiResult<Response> {
    let rt = pod_rt(app);
    let pod = app.lock().get("/pods", ns, name).cloned().ok_or_else(|| ApiError::not_found(&rt, name))?;
    let names: Vec<String> = ["containers", "initContainers"]
        .iter()
        .flat_map(|l| pod["spec"][*l].as_array().cloned().unwrap_or_default())
        .filter_map(|c| c["name"].as_str().map(String::from))
        .collect();
    let main: Vec<&Value> = pod["spec"]["containers"].as_array().into_iter().flatten().collect();
    let container = match q.get("container").filter(|c| !c.is_empty()) {
        Some(c) if names.contains(c) => c.clone(),
        Some(c) => return Err(ApiError::bad_request(format!("container {c} is not valid for pod {name}"))),
        None if main.len() == 1 => main[0]["name"].as_str().unwrap_or_default().to_string(),
        None => {
            return Err(ApiError::bad_request(format!(
                "a container name must be specified for pod {name}, choose one of: [{}]",
                names.join(" ")
            )))
        }
    };
    if q.get("previous").is_some_and(|p| p == "true") {
        return Err(ApiError::bad_request(format!(
            "previous terminated container {container:?} in pod {name:?} not found"
        )));
    }
    let status = ["containerStatuses", "initContainerStatuses"]
        .iter()
        .flat_map(|l| pod["status"][*l].as_array().cloned().unwrap_or_default())
        .find(|s| s["name"] == container.as_str());
    let waiting = match &status {
        None => Some("ContainerCreating".to_string()),
        Some(s) if s["state"]["waiting"].is_object() && s["lastState"]["terminated"].is_null() => {
            Some(s["state"]["waiting"]["reason"].as_str().unwrap_or("ContainerCreating").to_string())
        }
        _ => None,
    };
    if let Some(reason) = waiting {
        let why = match reason.as_str() {
            "ErrImagePull" | "ImagePullBackOff" => "trying and failing to pull image".to_string(),
            other => other.to_string(),
        };
        return Err(ApiError::bad_request(format!(
            "container {container:?} in pod {name:?} is waiting to start: {why}"
        )));
    }
    let uid = pod["metadata"]["uid"].as_str().unwrap_or_default().to_string();
    let follow = q.get("follow").is_some_and(|f| f == "true");
    let timestamps = q.get("timestamps").is_some_and(|f| f == "true");
    let tail: Option<usize> = q.get("tailLines").and_then(|t| t.parse::<i64>().ok()).map(|t| t.max(0) as usize);
    let mut limit: Option<usize> = q.get("limitBytes").and_then(|t| t.parse().ok());
    let since: Option<DateTime<Utc>> = match (q.get("sinceSeconds"), q.get("sinceTime")) {
        (Some(s), _) => s.parse::<i64>().ok().map(|s| Utc::now() - chrono::Duration::seconds(s)),
        (None, Some(t)) => DateTime::parse_from_rfc3339(t).ok().map(|t| t.with_timezone(&Utc)),
        _ => None,
    };
    let render = move |(ts, line): &(DateTime<Utc>, String)| {
        if timestamps {
            format!("{} {line}", ts.to_rfc3339_opts(SecondsFormat::Nanos, true))
        } else {
            line.clone()
        }
    };
    let buf = app.logs.snapshot(&uid, &container);
    let mut lines: Vec<&(DateTime<Utc>, String)> =
        buf.lines.iter().filter(|(ts, _)| since.is_none_or(|s| *ts >= s)).collect();
    if let Some(t) = tail {
        lines = lines.split_off(lines.len().saturating_sub(t));
    }
    let mut first = String::new();
    for l in lines {
        first.push_str(&render(l));
    }
    let cap = |s: &mut String, limit: &mut Option<usize>| {
        if let Some(l) = limit {
            if s.len() > *l {
                let mut cut = *l;
                while !s.is_char_boundary(cut) {
                    cut -= 1;
                }
                s.truncate(cut);
            }
            *l -= s.len();
        }
    };
    cap(&mut first, &mut limit);
    if !follow || buf.done || limit == Some(0) {
        return Ok((StatusCode::OK, [("content-type", "text/plain")], first).into_response());
    }
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(64);
    let app2 = app.clone();
    let mut sent = buf.lines.len();
    tokio::spawn(async move {
        if !first.is_empty() && tx.send(Ok(Bytes::from(first))).await.is_err() {
            return;
        }
        loop {
            let notified = app2.logs.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let b = app2.logs.snapshot(&uid, &container);
            let mut chunk: String = b.lines[sent.min(b.lines.len())..].iter().map(&render).collect();
            sent = b.lines.len();
            cap(&mut chunk, &mut limit);
            if !chunk.is_empty() && tx.send(Ok(Bytes::from(chunk))).await.is_err() {
                return;
            }
            if b.done || limit == Some(0) || pod_gone(&app2, &uid) {
                return;
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {
                    if pod_gone(&app2, &uid) { return; }
                }
                _ = tx.closed() => return,
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|x| (x, rx)) });
    Ok((StatusCode::OK, [("content-type", "text/plain")], Body::from_stream(stream)).into_response())
}

fn pod_gone(app: &App, uid: &str) -> bool {
    !app.lock().list("/pods", None).iter().any(|p| p["metadata"]["uid"] == uid)
}

/// The node object the scheduler binds to.
pub fn node_object() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": NODE, "labels": {"kubernetes.io/hostname": NODE, "kubernetes.io/os": "linux"}},
        "spec": {},
        "status": {
            "capacity": {"cpu": "2", "memory": "4Gi", "pods": "110"},
            "allocatable": {"cpu": "2", "memory": "4Gi", "pods": "110"},
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "kubelet is posting ready status"}],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": NODE}],
            "nodeInfo": {"kubeletVersion": "v1.32.0-kubesim", "containerRuntimeVersion": "kubesim://1", "operatingSystem": "linux", "architecture": "amd64"},
        },
    })
}

/// Watches pods and gives every new one to a simulated life.
pub async fn run(app: Arc<App>, exec: bool) {
    let mut handled: HashSet<String> = HashSet::new();
    loop {
        let (mut rx, pods) = {
            let inner = app.lock();
            (inner.tx.subscribe(), inner.list("/pods", None).into_iter().cloned().collect::<Vec<_>>())
        };
        for p in pods {
            start(&app, &p, &mut handled, exec);
        }
        loop {
            match rx.recv().await {
                Ok(ev) if ev.key == "/pods" => match ev.kind {
                    EventType::Deleted => {
                        let uid = ev.object["metadata"]["uid"].as_str().unwrap_or_default().to_string();
                        handled.remove(&uid);
                        app.logs.forget(&uid);
                    }
                    _ => start(&app, &ev.object, &mut handled, exec),
                },
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(_)) => break,
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }
}

fn start(app: &Arc<App>, pod: &Value, handled: &mut HashSet<String>, exec: bool) {
    let uid = pod["metadata"]["uid"].as_str().unwrap_or_default().to_string();
    if handled.contains(&uid) || !pod["metadata"]["deletionTimestamp"].is_null() {
        return;
    }
    if matches!(pod["status"]["phase"].as_str(), Some("Succeeded" | "Failed")) {
        return;
    }
    let node = pod["spec"]["nodeName"].as_str().unwrap_or_default();
    if !node.is_empty() && node != NODE {
        return;
    }
    handled.insert(uid.clone());
    let ns = pod["metadata"]["namespace"].as_str().unwrap_or_default().to_string();
    let name = pod["metadata"]["name"].as_str().unwrap_or_default().to_string();
    let app = app.clone();
    tokio::spawn(async move { simulate(app, ns, name, uid, exec).await });
}

fn ts() -> String {
    objects::now()
}

/// Applies `f` to the live pod (if it is still the same pod) and writes the result.
fn with_pod(
    app: &App,
    ns: &str,
    name: &str,
    uid: &str,
    status: bool,
    manager: &str,
    f: impl FnOnce(&mut Value),
) -> Option<Value> {
    let mut inner = app.lock();
    let pod = inner.get("/pods", ns, name).filter(|p| p["metadata"]["uid"] == uid)?.clone();
    let mut new = pod.clone();
    f(&mut new);
    let rt = inner.registry.find("", "v1", "pods").cloned()?;
    let mut ctx = WriteCtx::internal(manager);
    let r = objects::update(&mut inner, &rt, "v1", ns, name, new, status.then_some("status"), &mut ctx, false).ok();
    app.wake_gc(&mut inner);
    r
}

fn live(app: &App, ns: &str, name: &str, uid: &str) -> Option<Value> {
    app.lock().get("/pods", ns, name).filter(|p| p["metadata"]["uid"] == uid).cloned()
}

/// Records a core/v1 Event about the pod, as the scheduler and kubelet do.
fn event(app: &App, pod: &Value, type_: &str, reason: &str, message: &str, component: &str, field_path: Option<&str>) {
    let mut inner = app.lock();
    let Some(rt) = inner.registry.find("", "v1", "events").cloned() else {
        return;
    };
    let ns = pod["metadata"]["namespace"].as_str().unwrap_or_default();
    let t = ts();
    let mut involved = json!({
        "kind": "Pod", "namespace": ns, "name": pod["metadata"]["name"], "uid": pod["metadata"]["uid"],
        "apiVersion": "v1", "resourceVersion": pod["metadata"]["resourceVersion"],
    });
    if let Some(fp) = field_path {
        involved["fieldPath"] = json!(fp);
    }
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..16];
    let ev = json!({
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"name": format!("{}.{suffix}", pod["metadata"]["name"].as_str().unwrap_or_default()), "namespace": ns},
        "involvedObject": involved, "reason": reason, "message": message,
        "source": if component == "kubelet" { json!({"component": component, "host": NODE}) } else { json!({"component": component}) },
        "firstTimestamp": t, "lastTimestamp": t, "count": 1, "type": type_,
        "eventTime": null, "reportingComponent": component, "reportingInstance": if component == "kubelet" { NODE } else { "" },
    });
    let mut ctx = WriteCtx::internal(component);
    let _ = objects::create(&mut inner, &rt, "v1", ns, ev, &mut ctx);
}

fn ann<'a>(pod: &'a Value, key: &str, container: Option<&str>) -> Option<&'a str> {
    let a = &pod["metadata"]["annotations"];
    if let Some(c) = container {
        if let Some(v) = a[format!("{ANN}{key}.{c}")].as_str() {
            return Some(v);
        }
    }
    a[format!("{ANN}{key}")].as_str()
}

fn ann_ms(pod: &Value, key: &str, default: u64) -> Duration {
    Duration::from_millis(ann(pod, key, None).and_then(|v| v.parse().ok()).unwrap_or(default))
}

fn containers(pod: &Value) -> Vec<Value> {
    pod["spec"]["containers"].as_array().cloned().unwrap_or_default()
}

fn condition(type_: &str, status: bool, reason: Option<&str>) -> Value {
    let mut c = json!({"type": type_, "status": if status { "True" } else { "False" }, "lastProbeTime": null, "lastTransitionTime": ts()});
    if let Some(r) = reason {
        c["reason"] = json!(r);
    }
    c
}

fn container_status(c: &Value, state: Value, ready: bool, restarts: i64, last: Value) -> Value {
    let image = c["image"].as_str().unwrap_or_default();
    let started = state["running"].is_object();
    let mut s = json!({
        "name": c["name"], "image": image, "imageID": if state["waiting"].is_object() { String::new() } else { format!("kubesim://{image}") },
        "ready": ready, "restartCount": restarts, "started": started, "state": state, "lastState": last,
    });
    if !state["waiting"].is_object() {
        s["containerID"] = json!(format!("kubesim://{}", &uuid::Uuid::new_v4().simple().to_string()));
    }
    s
}

/// How a simulated pod ends.
#[derive(PartialEq, Clone, Copy)]
enum Outcome {
    Exit,
    OomKilled,
    /// Runs until `activeDeadlineSeconds` ends it (or forever).
    Deadline,
    ImagePull,
    Vanish,
}

fn outcome(pod: &Value) -> Outcome {
    match ann(pod, "outcome", None).unwrap_or("").to_ascii_lowercase().as_str() {
        "oomkilled" | "oom" => Outcome::OomKilled,
        "deadlineexceeded" | "deadline" | "hang" => Outcome::Deadline,
        "errimagepull" | "imagepullbackoff" => Outcome::ImagePull,
        "vanish" => Outcome::Vanish,
        _ => Outcome::Exit,
    }
}

/// Ends a pod whose deletion was asked for: containers are stopped, then the object goes.
fn finish_deletion(app: &App, ns: &str, name: &str, uid: &str) {
    if let Some(pod) = live(app, ns, name, uid) {
        for c in containers(&pod) {
            app.logs.finish(uid, c["name"].as_str().unwrap_or_default());
            event(
                app,
                &pod,
                "Normal",
                "Killing",
                &format!("Stopping container {}", c["name"].as_str().unwrap_or_default()),
                "kubelet",
                None,
            );
        }
        with_pod(app, ns, name, uid, true, "kubelet", |p| {
            let specs = containers(p);
            let statuses = p["status"]["containerStatuses"].as_array().cloned().unwrap_or_default();
            let new: Vec<Value> = specs
                .iter()
                .map(|c| {
                    let cur = statuses.iter().find(|s| s["name"] == c["name"]).cloned();
                    match cur {
                        Some(s) if s["state"]["terminated"].is_object() => s,
                        _ => container_status(c, json!({"terminated": {"exitCode": 137, "reason": "Error", "startedAt": p["status"]["startTime"], "finishedAt": ts()}}), false, 0, json!({})),
                    }
                })
                .collect();
            p["status"]["containerStatuses"] = Value::Array(new);
            if !matches!(p["status"]["phase"].as_str(), Some("Succeeded" | "Failed")) {
                p["status"]["phase"] = json!("Failed");
            }
        });
        let mut inner = app.lock();
        let Some(rt) = inner.registry.find("", "v1", "pods").cloned() else {
            return;
        };
        let ctx = WriteCtx::internal("kubelet");
        let _ = objects::delete(&mut inner, &rt, ns, name, &DeleteOpts { grace: Some(0), ..Default::default() }, &ctx);
        app.wake_gc(&mut inner);
    }
}

/// A Warning event about a pod from the kubelet.
pub fn warn_event(app: &App, pod: &Value, reason: &str, message: &str) {
    event(app, pod, "Warning", reason, message, "kubelet", None);
}

/// Sleeps up to `d`; false when the pod is gone or its deletion was asked for.
pub async fn wait_pod(app: &App, ns: &str, name: &str, uid: &str, d: Duration) -> bool {
    wait(app, ns, name, uid, d).await
}

/// Sleeps up to `d`; returns early with `false` when the pod is gone or its deletion was asked for.
async fn wait(app: &App, ns: &str, name: &str, uid: &str, d: Duration) -> bool {
    let end = tokio::time::Instant::now() + d;
    loop {
        // Woken by a change of this pod only: thousands of pods wait at once.
        let waker = app.lock().pod_waker(ns, name);
        let changed = waker.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        // Looked at in place (no copy).
        let running = {
            let mut store = app.lock();
            let pod = store.get("/pods", ns, name);
            let running =
                pod.is_some_and(|p| p["metadata"]["uid"] == uid && p["metadata"]["deletionTimestamp"].is_null());
            if pod.is_none() {
                store.pod_wakers.remove(&(ns.to_string(), name.to_string()));
            }
            running
        };
        if !running {
            return false;
        }
        if tokio::time::Instant::now() >= end {
            return true;
        }
        tokio::select! {
            () = &mut changed => {}
            () = tokio::time::sleep_until(end) => return true,
        }
    }
}

/// The first PersistentVolumeClaim the pod mounts that does not exist in its namespace.
fn missing_claim(app: &App, pod: &Value) -> Option<String> {
    let ns = pod["metadata"]["namespace"].as_str().unwrap_or_default();
    let inner = app.lock();
    pod["spec"]["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["persistentVolumeClaim"]["claimName"].as_str())
        .find(|claim| inner.get("/persistentvolumeclaims", ns, claim).is_none())
        .map(str::to_owned)
}

/// A pod's life on the node; `exec` runs the containers for real instead of playing them.
async fn simulate(app: Arc<App>, ns: String, name: String, uid: String, exec: bool) {
    let Some(pod) = live(&app, &ns, &name, &uid) else {
        return;
    };
    // The scheduler binds the pod, once every claim it mounts exists (else it stays Pending,
    // unschedulable, as the volume binding plugin keeps it).
    let mut pod = pod;
    let mut warned = false;
    while pod["spec"]["nodeName"].as_str().is_none_or(str::is_empty) {
        let Some(claim) = missing_claim(&app, &pod) else { break };
        if !warned {
            let message = format!("0/1 nodes are available: persistentvolumeclaim \"{claim}\" not found.");
            let Some(p) = with_pod(&app, &ns, &name, &uid, true, "kube-scheduler", |p| {
                let mut c = condition("PodScheduled", false, Some("Unschedulable"));
                c["message"] = json!(message);
                p["status"]["phase"] = json!("Pending");
                p["status"]["conditions"] = json!([c]);
            }) else {
                return;
            };
            event(&app, &p, "Warning", "FailedScheduling", &message, "default-scheduler", None);
            warned = true;
        }
        if !wait(&app, &ns, &name, &uid, Duration::from_secs(1)).await {
            return finish_deletion(&app, &ns, &name, &uid);
        }
        let Some(p) = live(&app, &ns, &name, &uid) else { return };
        pod = p;
    }
    if pod["spec"]["nodeName"].as_str().is_none_or(str::is_empty) {
        let Some(pod) = with_pod(&app, &ns, &name, &uid, false, "kube-scheduler", |p| {
            p["spec"]["nodeName"] = json!(NODE);
            p["status"]["conditions"] = json!([condition("PodScheduled", true, None)]);
        }) else {
            return;
        };
        event(
            &app,
            &pod,
            "Normal",
            "Scheduled",
            &format!("Successfully assigned {ns}/{name} to {NODE}"),
            "default-scheduler",
            None,
        );
    }
    let Some(pod) = live(&app, &ns, &name, &uid) else {
        return;
    };
    let out = if exec { Outcome::Exit } else { outcome(&pod) };
    let specs = containers(&pod);
    let started_at = Utc::now();
    let deadline = pod["spec"]["activeDeadlineSeconds"].as_i64().map(|s| Duration::from_secs(s.max(0) as u64));
    let ip = if crate::exec::serves_network(&pod) {
        crate::exec::loopback_ip(&uid)
    } else {
        format!("10.244.0.{}", 2 + (uid.as_bytes()[0] as u32 + uid.as_bytes()[1] as u32) % 250)
    };
    with_pod(&app, &ns, &name, &uid, true, "kubelet", |p| {
        p["status"]["hostIP"] = json!("127.0.0.1");
        p["status"]["hostIPs"] = json!([{"ip": "127.0.0.1"}]);
        p["status"]["podIP"] = json!(ip);
        p["status"]["podIPs"] = json!([{"ip": ip}]);
        p["status"]["startTime"] = json!(started_at.to_rfc3339_opts(SecondsFormat::Secs, true));
        p["status"]["conditions"] = json!([
            condition("PodReadyToStartContainers", true, None),
            condition("Initialized", true, None),
            condition("Ready", false, Some("ContainersNotReady")),
            condition("ContainersReady", false, Some("ContainersNotReady")),
            condition("PodScheduled", true, None),
        ]);
        let inits: Vec<Value> = p["spec"]["initContainers"].as_array().cloned().unwrap_or_default().iter()
            .map(|c| container_status(c, json!({"terminated": {"exitCode": 0, "reason": "Completed", "startedAt": ts(), "finishedAt": ts()}}), true, 0, json!({})))
            .collect();
        if !inits.is_empty() {
            p["status"]["initContainerStatuses"] = Value::Array(inits);
        }
        p["status"]["containerStatuses"] = Value::Array(
            specs
                .iter()
                .map(|c| container_status(c, json!({"waiting": {"reason": "ContainerCreating"}}), false, 0, json!({})))
                .collect(),
        );
    });
    // A slow start stays in ContainerCreating (and counts against the deadline, as on a node).
    if !wait(&app, &ns, &name, &uid, ann_ms(&pod, "start-delay-ms", 50)).await {
        return finish_deletion(&app, &ns, &name, &uid);
    }
    if out == Outcome::ImagePull {
        return image_pull_failure(&app, &ns, &name, &uid, &specs).await;
    }
    let mut restarts = 0i64;
    loop {
        let Some(pod) = live(&app, &ns, &name, &uid) else {
            return;
        };
        for c in &specs {
            let cn = c["name"].as_str().unwrap_or_default();
            event(
                &app,
                &pod,
                "Normal",
                "Pulled",
                &format!("Container image {:?} already present on machine", c["image"].as_str().unwrap_or_default()),
                "kubelet",
                Some(&format!("spec.containers{{{cn}}}")),
            );
            event(
                &app,
                &pod,
                "Normal",
                "Created",
                &format!("Created container: {cn}"),
                "kubelet",
                Some(&format!("spec.containers{{{cn}}}")),
            );
            event(
                &app,
                &pod,
                "Normal",
                "Started",
                &format!("Started container {cn}"),
                "kubelet",
                Some(&format!("spec.containers{{{cn}}}")),
            );
        }
        let run_start = ts();
        with_pod(&app, &ns, &name, &uid, true, "kubelet", |p| {
            p["status"]["phase"] = json!("Running");
            let prev = p["status"]["containerStatuses"].as_array().cloned().unwrap_or_default();
            p["status"]["containerStatuses"] = Value::Array(
                specs
                    .iter()
                    .map(|c| {
                        let last = prev
                            .iter()
                            .find(|s| s["name"] == c["name"])
                            .map(|s| s["lastState"].clone())
                            .unwrap_or(json!({}));
                        container_status(c, json!({"running": {"startedAt": run_start}}), true, restarts, last)
                    })
                    .collect(),
            );
            set_ready(p, true, None);
        });
        let remaining = deadline.map(|d| d.saturating_sub((Utc::now() - started_at).to_std().unwrap_or_default()));
        let end = if exec {
            crate::exec::run(&app, &pod, &specs, &run_start, remaining).await
        } else {
            simulate_run(&app, &pod, &specs, out, &run_start, remaining).await
        };
        let terminated = match end {
            RunEnd::Deleted => return finish_deletion(&app, &ns, &name, &uid),
            RunEnd::Vanished => return,
            RunEnd::Exited(t) => t,
            RunEnd::Deadline => {
                let Some(pod) = live(&app, &ns, &name, &uid) else {
                    return;
                };
                for c in &specs {
                    app.logs.finish(&uid, c["name"].as_str().unwrap_or_default());
                }
                event(
                    &app,
                    &pod,
                    "Normal",
                    "DeadlineExceeded",
                    "Pod was active on the node longer than the specified deadline",
                    "kubelet",
                    None,
                );
                with_pod(&app, &ns, &name, &uid, true, "kubelet", |p| {
                    p["status"]["phase"] = json!("Failed");
                    p["status"]["reason"] = json!("DeadlineExceeded");
                    p["status"]["message"] = json!("Pod was active on the node longer than the specified deadline");
                    p["status"]["containerStatuses"] = Value::Array(specs.iter().map(|c| {
                        container_status(c, json!({"terminated": {"exitCode": 137, "reason": "Error", "startedAt": run_start, "finishedAt": ts()}}), false, restarts, json!({}))
                    }).collect());
                    set_ready(p, false, Some("PodFailed"));
                });
                return wait_for_deletion(&app, &ns, &name, &uid).await;
            }
        };
        let Some(pod) = live(&app, &ns, &name, &uid) else {
            return;
        };
        let all_zero = terminated.iter().all(|t| t["exitCode"] == 0);
        let policy = pod["spec"]["restartPolicy"].as_str().unwrap_or("Always").to_string();
        let restart = policy == "Always" || (policy == "OnFailure" && !all_zero);
        if restart {
            restarts += 1;
            with_pod(&app, &ns, &name, &uid, true, "kubelet", |p| {
                p["status"]["containerStatuses"] = Value::Array(specs.iter().zip(&terminated).map(|(c, t)| {
                    let state = if t["exitCode"] != 0 {
                        json!({"waiting": {"reason": "CrashLoopBackOff", "message": format!("back-off 10s restarting failed container={} pod={name}_{ns}({uid})", c["name"].as_str().unwrap_or_default())}})
                    } else {
                        json!({"waiting": {"reason": "ContainerCreating"}})
                    };
                    container_status(c, state, false, restarts, json!({"terminated": t}))
                }).collect());
                set_ready(p, false, Some("ContainersNotReady"));
            });
            if !wait(&app, &ns, &name, &uid, ann_ms(&pod, "restart-delay-ms", 1000)).await {
                return finish_deletion(&app, &ns, &name, &uid);
            }
            continue;
        }
        with_pod(&app, &ns, &name, &uid, true, "kubelet", |p| {
            p["status"]["phase"] = json!(if all_zero { "Succeeded" } else { "Failed" });
            p["status"]["containerStatuses"] = Value::Array(
                specs
                    .iter()
                    .zip(&terminated)
                    .map(|(c, t)| container_status(c, json!({"terminated": t}), false, restarts, json!({})))
                    .collect(),
            );
            set_ready(p, false, Some(if all_zero { "PodCompleted" } else { "PodFailed" }));
        });
        return wait_for_deletion(&app, &ns, &name, &uid).await;
    }
}

/// How one run of a pod's containers ended.
pub enum RunEnd {
    /// Deletion was asked for while running.
    Deleted,
    /// The pod disappeared (a `vanish` simulation).
    Vanished,
    /// `activeDeadlineSeconds` ran out.
    Deadline,
    /// Every container exited: their `state.terminated`.
    Exited(Vec<Value>),
}

/// One simulated run: the annotations say what the containers print, how long they run and how
/// they end.
async fn simulate_run(
    app: &Arc<App>,
    pod: &Value,
    specs: &[Value],
    out: Outcome,
    run_start: &str,
    remaining: Option<Duration>,
) -> RunEnd {
    let (ns, name, uid) = ids(pod);
    for c in specs {
        let cn = c["name"].as_str().unwrap_or_default();
        if let Some(text) = ann(pod, "stdout", Some(cn)) {
            app.logs.write(&uid, cn, text);
        }
    }
    if out == Outcome::Vanish {
        wait(app, &ns, &name, &uid, ann_ms(pod, "run-ms", 200)).await;
        let mut inner = app.lock();
        if live_in(&inner, &ns, &name, &uid) {
            inner.remove("/pods", &ns, &name);
            app.wake_gc(&mut inner);
        }
        return RunEnd::Vanished;
    }
    let run_for = if out == Outcome::Deadline { Duration::from_secs(u64::MAX / 4) } else { ann_ms(pod, "run-ms", 200) };
    let (run_for, by_deadline) = match remaining {
        Some(d) if run_for >= d => (d, true),
        _ => (run_for, false),
    };
    if !wait(app, &ns, &name, &uid, run_for).await {
        return RunEnd::Deleted;
    }
    if by_deadline {
        return RunEnd::Deadline;
    }
    let mut terminated = vec![];
    for c in specs {
        let cn = c["name"].as_str().unwrap_or_default();
        let (code, reason) = if out == Outcome::OomKilled {
            (137, "OOMKilled")
        } else {
            let code: i64 = ann(pod, "exit-code", Some(cn)).and_then(|v| v.parse().ok()).unwrap_or(0);
            (code, if code == 0 { "Completed" } else { "Error" })
        };
        // What the container wrote to terminationMessagePath, or its log's tail on error.
        let message = ann(pod, "termination-message", Some(cn)).map(String::from);
        terminated.push(terminated_state(app, &uid, c, code, reason, run_start, message));
    }
    RunEnd::Exited(terminated)
}

/// `state.terminated` of a container that exited; marks its log complete.
pub fn terminated_state(
    app: &App,
    uid: &str,
    c: &Value,
    code: i64,
    reason: &str,
    run_start: &str,
    message: Option<String>,
) -> Value {
    let cn = c["name"].as_str().unwrap_or_default();
    let mut term = json!({"exitCode": code, "reason": reason, "startedAt": run_start, "finishedAt": ts()});
    let message = message.filter(|m| !m.is_empty()).or_else(|| {
        (c["terminationMessagePolicy"] == "FallbackToLogsOnError" && code != 0)
            .then(|| app.logs.tail(uid, cn, 80, 2048))
            .filter(|m| !m.is_empty())
    });
    if let Some(m) = message {
        term["message"] = json!(m.chars().take(4096).collect::<String>());
    }
    app.logs.finish(uid, cn);
    term
}

/// Namespace, name and uid of a pod.
pub fn ids(pod: &Value) -> (String, String, String) {
    let m = &pod["metadata"];
    let s = |k: &str| m[k].as_str().unwrap_or_default().to_string();
    (s("namespace"), s("name"), s("uid"))
}

fn live_in(inner: &crate::store::Inner, ns: &str, name: &str, uid: &str) -> bool {
    inner.get("/pods", ns, name).is_some_and(|p| p["metadata"]["uid"] == uid)
}

fn set_ready(p: &mut Value, ready: bool, reason: Option<&str>) {
    let conds = p["status"]["conditions"].as_array().cloned().unwrap_or_default();
    let conds: Vec<Value> = conds
        .into_iter()
        .map(|c| {
            if c["type"] == "Ready" || c["type"] == "ContainersReady" {
                let t = c["type"].as_str().unwrap_or_default().to_string();
                if (c["status"] == "True") == ready {
                    return c;
                }
                condition(&t, ready, reason)
            } else {
                c
            }
        })
        .collect();
    p["status"]["conditions"] = Value::Array(conds);
}

async fn image_pull_failure(app: &Arc<App>, ns: &str, name: &str, uid: &str, specs: &[Value]) {
    let mut backoff = false;
    loop {
        let Some(pod) = live(app, ns, name, uid) else {
            return;
        };
        let (reason, event_reason) = if backoff { ("ImagePullBackOff", "BackOff") } else { ("ErrImagePull", "Failed") };
        for c in specs {
            let image = c["image"].as_str().unwrap_or_default();
            let msg = if backoff {
                format!("Back-off pulling image {image:?}")
            } else {
                format!("Failed to pull image {image:?}: rpc error: code = NotFound desc = kubesim: image {image:?} is set to fail pulling")
            };
            let cn = c["name"].as_str().unwrap_or_default();
            event(
                app,
                &pod,
                if backoff { "Normal" } else { "Warning" },
                event_reason,
                &msg,
                "kubelet",
                Some(&format!("spec.containers{{{cn}}}")),
            );
        }
        with_pod(app, ns, name, uid, true, "kubelet", |p| {
            p["status"]["containerStatuses"] = Value::Array(
                specs
                    .iter()
                    .map(|c| {
                        let image = c["image"].as_str().unwrap_or_default();
                        let msg = if backoff {
                            format!("Back-off pulling image {image:?}")
                        } else {
                            format!("rpc error: code = NotFound desc = kubesim: image {image:?} is set to fail pulling")
                        };
                        container_status(c, json!({"waiting": {"reason": reason, "message": msg}}), false, 0, json!({}))
                    })
                    .collect(),
            );
        });
        backoff = !backoff;
        if !wait(app, ns, name, uid, Duration::from_millis(if backoff { 500 } else { 1500 })).await {
            return finish_deletion(app, ns, name, uid);
        }
    }
}

/// A finished pod stays until deleted (graceful deletion of a terminal pod is immediate).
async fn wait_for_deletion(app: &Arc<App>, ns: &str, name: &str, uid: &str) {
    while wait(app, ns, name, uid, Duration::from_secs(3600)).await {}
    finish_deletion(app, ns, name, uid);
}

/// Stores the node at startup.
pub fn register_node(app: &App) {
    let mut inner = app.lock();
    let mut node = node_object();
    node["metadata"]["uid"] = json!(objects::new_uid());
    node["metadata"]["creationTimestamp"] = json!(ts());
    inner.put("/nodes", "", node, EventType::Added);
}
