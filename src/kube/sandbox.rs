//! Pure builders of the kubernetes-sigs/agent-sandbox objects a task becomes with
//! `--kube-backend sandbox` (src/kube/agent-sandbox.md says what agent-sandbox does with them).
//!
//! - The cold path: a `Sandbox` (`agents.x-k8s.io`) whose `podTemplate` is the very pod podjob
//!   would create ([`podspec::build`]: hardened, `runtimeClassName` from the task's isolation,
//!   `activeDeadlineSeconds` from its timeout), named like that pod, so the controller's pod has
//!   the name podjob's pod would have. `shutdownTime` is the task's deadline plus a grace period,
//!   and `shutdownPolicy` is `Delete` (agent-sandbox's default is `Retain`): a Sandbox left behind
//!   by a crashed service still goes away. The input ConfigMaps and the default-deny
//!   NetworkPolicy are podjob's, unchanged (the policy selects the pod by the task's label,
//!   which the pod template carries). The Sandbox carries the pod's labels and its allowed
//!   annotations on its own metadata as well.
//! - The warm path: a `SandboxClaim` (`extensions.agents.x-k8s.io`) on a tenant's warm pool, with
//!   a `lifecycle` whose `shutdownTime` bounds the claim like the cold Sandbox's and whose
//!   `shutdownPolicy` is `Delete`.
//!
//! The objects are [`DynamicObject`]s because the API version is a setting (v1beta1, the
//! storage version, or v1alpha1); the typed structs here are their `spec`s and `status`. No I/O.
//!
//! [`observe`] reads a run's state from a Sandbox's status and its pod; the reconciler uses it
//! for tasks whose backend is `sandbox`.
//!
//! Not here yet (issue 12): handing code and inputs to a claimed warm sandbox, and the
//! NetworkPolicy that covers claimed pods.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, PodSpec};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use serde::{Deserialize, Serialize};

use super::crd::AgentTask;
use super::podspec::{self, BuildError, PodSettings, TaskDefaults};
use super::reconcile::{observe as observe_pod, Observed};
use crate::domain::outcome::Termination;

/// API group of `Sandbox`.
pub const GROUP: &str = "agents.x-k8s.io";
/// API group of `SandboxTemplate`, `SandboxClaim` and `SandboxWarmPool`.
pub const EXTENSIONS_GROUP: &str = "extensions.agents.x-k8s.io";

/// How long after a task's deadline its Sandbox or claim is shut down by agent-sandbox itself:
/// room for scheduling, the image pull and the pod's own `activeDeadlineSeconds` (counted from
/// the pod's start), so that agent-sandbox only ever removes what the service failed to.
/// (To become a setting with the backend.)
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(300);

/// Which agent-sandbox API version the backend speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxApiVersion {
    /// The storage version.
    #[default]
    V1beta1,
    /// The older version, still served (claims name a template, not a pool).
    V1alpha1,
}

impl SandboxApiVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxApiVersion::V1beta1 => "v1beta1",
            SandboxApiVersion::V1alpha1 => "v1alpha1",
        }
    }
}

/// The agent-sandbox kinds the backend writes or reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sandbox,
    SandboxClaim,
    SandboxWarmPool,
    SandboxTemplate,
}

impl Kind {
    fn group_and_plural(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Kind::Sandbox => (GROUP, "Sandbox", "sandboxes"),
            Kind::SandboxClaim => (EXTENSIONS_GROUP, "SandboxClaim", "sandboxclaims"),
            Kind::SandboxWarmPool => (EXTENSIONS_GROUP, "SandboxWarmPool", "sandboxwarmpools"),
            Kind::SandboxTemplate => (EXTENSIONS_GROUP, "SandboxTemplate", "sandboxtemplates"),
        }
    }
}

/// The `ApiResource` of `kind` in `version`, for `Api::<DynamicObject>::namespaced_with`.
pub fn api_resource(kind: Kind, version: SandboxApiVersion) -> ApiResource {
    let (group, kind, plural) = kind.group_and_plural();
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version.as_str(), kind), plural)
}

/// What agent-sandbox does with a Sandbox at its `shutdownTime`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShutdownPolicy {
    /// The Sandbox is deleted (with its pod).
    Delete,
    /// Only the pod goes; the Sandbox stays with `Ready=False`, `SandboxExpired`.
    Retain,
}

/// `spec.podTemplate`: only labels and annotations of the metadata are used.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct PodTemplate {
    #[serde(default)]
    pub metadata: PodMetadata,
    pub spec: PodSpec,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct PodMetadata {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// The part of a Sandbox's spec the backend sets.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SandboxSpec {
    pub pod_template: PodTemplate,
    /// RFC 3339, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shutdown_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shutdown_policy: Option<ShutdownPolicy>,
}

/// A Sandbox's status, as the controller writes it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SandboxStatus {
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default, rename = "podIPs")]
    pub pod_ips: Vec<String>,
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default)]
    pub selector: Option<String>,
}

/// A SandboxClaim's status: the bound Sandbox and the conditions forwarded from it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct SandboxClaimStatus {
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default)]
    pub sandbox: ClaimedSandbox,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
pub struct ClaimedSandbox {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, rename = "podIPs")]
    pub pod_ips: Vec<String>,
}

impl SandboxStatus {
    /// The condition of `type_`, if the controller wrote it.
    pub fn condition(&self, type_: &str) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }
}

/// Pure: what a cold-path Sandbox says about its run. The pod, when there is one, says most
/// (exit code, OOM, deadline, image pulls: [`observe_pod`]); the Sandbox's conditions say the
/// rest:
/// - `Ready=False`, `SandboxExpired`: agent-sandbox removed the pod at `shutdownTime` (the
///   deadline plus grace), so the run timed out;
/// - no pod, but `Finished`: the pod ended and is gone; its exit and log are lost (`PodMissing`);
/// - no pod and `Ready=False`, `ReconcilerError`: the controller could not create it (e.g. Pod
///   Security admission refused it), a backend error;
/// - otherwise no pod yet: `Pending`.
pub fn observe(status: &SandboxStatus, pod: Option<&Pod>, pull_grace: Duration, now: DateTime<Utc>) -> Observed {
    let ended = |termination| Observed::Ended { termination, exit_code: None, termination_message: None };
    let ready = status.condition("Ready");
    if ready.is_some_and(|c| c.status == "False" && c.reason == "SandboxExpired") {
        return ended(Termination::TimedOut);
    }
    if let Some(pod) = pod {
        return observe_pod(pod, pull_grace, now);
    }
    if let Some(f) = status.condition("Finished") {
        return ended(Termination::PodMissing(format!(
            "the Sandbox's pod ended ({}) and is gone, with its exit code and log",
            f.reason
        )));
    }
    match ready {
        Some(c) if c.status == "False" && c.reason == "ReconcilerError" => {
            ended(Termination::BackendError(format!("agent-sandbox could not create the pod: {}", c.message)))
        }
        _ => Observed::Pending { retry_in: None },
    }
}

/// How long a cold task's pod may run before its Sandbox's `Ready=False` is taken as more than
/// the controller catching up with the pod (agent-sandbox writes the Sandbox's status after the
/// pod's, so a fresh pod's Sandbox is briefly not Ready).
pub const READY_LAG: Duration = Duration::from_secs(3);

/// Pure: what the AgentTask's status message says while a cold task's pod runs but its Sandbox
/// is not `Ready` (`None` when it is, when the controller has not written `Ready` yet, or while
/// the pod has run for less than [`READY_LAG`]).
///
/// A cold task's outcome is its pod's: agent-sandbox makes the pod whatever the Sandbox's
/// readiness, and `Ready` only says whether the sandbox can take traffic (the pod Ready, with
/// IPs, its Service made). So a Sandbox that never becomes Ready does not end the run; the note
/// says why `kubectl get sandbox` shows it not Ready. (A warm claim must wait for `Ready`: that
/// is where the never-Ready case ends a task.)
pub fn not_ready_note(status: &SandboxStatus, running_since: DateTime<Utc>, now: DateTime<Utc>) -> Option<String> {
    let ready = status.condition("Ready")?;
    let lag = chrono::Duration::from_std(READY_LAG).unwrap_or_default();
    if ready.status == "True" || now - running_since < lag {
        return None;
    }
    Some(format!(
        "the pod runs but its Sandbox is not Ready ({}: {}); a cold task runs to its own end whatever the \
         Sandbox's readiness",
        ready.reason, ready.message
    ))
}

/// The `shutdownTime` of a task's Sandbox or claim: its deadline plus `grace`, in RFC 3339
/// seconds (rounded up, so it is never before the deadline plus grace).
pub fn shutdown_time(deadline: DateTime<Utc>, grace: Duration) -> String {
    let grace = chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::days(365));
    let t = deadline.checked_add_signed(grace).unwrap_or(DateTime::<Utc>::MAX_UTC);
    let whole = match t.timestamp_subsec_nanos() {
        0 => t,
        _ => t.checked_add_signed(chrono::Duration::seconds(1)).unwrap_or(t),
    };
    whole.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// Every object a task becomes on the cold path.
#[derive(Debug, Clone)]
pub struct SandboxObjects {
    pub config_maps: Vec<ConfigMap>,
    pub network_policy: NetworkPolicy,
    pub sandbox: DynamicObject,
}

/// The cold path's objects for `task`: podjob's ConfigMaps and NetworkPolicy, and a Sandbox
/// whose pod template is podjob's pod, shut down at `deadline + grace`.
pub fn build(
    task: &AgentTask,
    settings: &PodSettings,
    defaults: &TaskDefaults,
    version: SandboxApiVersion,
    deadline: DateTime<Utc>,
    grace: Duration,
) -> Result<SandboxObjects, BuildError> {
    let objs = podspec::build(task, settings, defaults)?;
    let pod = objs.pod;
    let spec = SandboxSpec {
        pod_template: PodTemplate {
            metadata: PodMetadata {
                labels: pod.metadata.labels.clone().unwrap_or_default(),
                annotations: pod.metadata.annotations.clone().unwrap_or_default(),
            },
            spec: pod.spec.clone().unwrap_or_default(),
        },
        shutdown_time: Some(shutdown_time(deadline, grace)),
        shutdown_policy: Some(ShutdownPolicy::Delete),
    };
    // Named like podjob's pod, labelled and owned like it. The pod's annotations (only task
    // labels under the operator's allowed prefixes) go on the Sandbox too: what reads a
    // Sandbox's own metadata (policy engines, the emulator's failure switches) sees them there.
    let meta = ObjectMeta {
        name: pod.metadata.name.clone(),
        namespace: pod.metadata.namespace.clone(),
        labels: pod.metadata.labels.clone(),
        annotations: pod.metadata.annotations.clone(),
        owner_references: pod.metadata.owner_references.clone(),
        ..ObjectMeta::default()
    };
    let sandbox = dynamic(Kind::Sandbox, version, meta, serde_json::to_value(spec).expect("a Sandbox spec serializes"));
    Ok(SandboxObjects { config_maps: objs.config_maps, network_policy: objs.network_policy, sandbox })
}

/// The warm path's claim on `pool` (v1beta1 `warmPoolRef`; v1alpha1 names the pool's
/// `template` and selects the pool with `warmpool`), expiring at `shutdown_time` with policy
/// `Delete`. `meta` gives its name, namespace, labels and owner.
pub fn claim(
    meta: ObjectMeta,
    version: SandboxApiVersion,
    pool: &str,
    template: &str,
    shutdown_time: String,
) -> DynamicObject {
    let lifecycle = serde_json::json!({"shutdownTime": shutdown_time, "shutdownPolicy": "Delete"});
    let spec = match version {
        SandboxApiVersion::V1beta1 => serde_json::json!({"warmPoolRef": {"name": pool}, "lifecycle": lifecycle}),
        SandboxApiVersion::V1alpha1 => {
            serde_json::json!({"sandboxTemplateRef": {"name": template}, "warmpool": pool, "lifecycle": lifecycle})
        }
    };
    dynamic(Kind::SandboxClaim, version, meta, spec)
}

fn dynamic(kind: Kind, version: SandboxApiVersion, meta: ObjectMeta, spec: serde_json::Value) -> DynamicObject {
    let ar = api_resource(kind, version);
    let mut obj =
        DynamicObject::new(meta.name.as_deref().unwrap_or_default(), &ar).data(serde_json::json!({"spec": spec}));
    obj.metadata = meta;
    obj
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::crd::{AgentTaskSpec, TaskResources};
    use chrono::TimeZone;

    fn task(isolation: Option<&str>) -> AgentTask {
        let mut t = AgentTask::new(
            "at-1",
            AgentTaskSpec {
                tenant: Some("acme".into()),
                code: "print(1)".into(),
                timeout_seconds: Some(7),
                resources: Some(TaskResources { cpu: Some("250m".into()), memory: Some("128Mi".into()) }),
                isolation: isolation.map(String::from),
                ..AgentTaskSpec::default()
            },
        );
        t.metadata.namespace = Some("agenttask".into());
        t.metadata.uid = Some("0000-uid".into());
        t
    }

    fn deadline() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 27, 12, 0, 0).unwrap()
    }

    #[test]
    fn sandbox_wraps_the_podjob_pod() {
        let t = task(Some("gvisor"));
        let settings = PodSettings::default();
        let defaults = TaskDefaults::default();
        let podjob = podspec::build(&t, &settings, &defaults).unwrap();
        let objs =
            build(&t, &settings, &defaults, SandboxApiVersion::V1beta1, deadline(), Duration::from_secs(90)).unwrap();
        let sb = &objs.sandbox;
        assert_eq!(sb.types.as_ref().unwrap().api_version, "agents.x-k8s.io/v1beta1");
        assert_eq!(sb.types.as_ref().unwrap().kind, "Sandbox");
        assert_eq!(sb.metadata.name, podjob.pod.metadata.name, "named like podjob's pod");
        assert_eq!(sb.metadata.namespace.as_deref(), Some("agenttask"));
        let owner = &sb.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!((owner.kind.as_str(), owner.controller), ("AgentTask", Some(true)));

        let spec: SandboxSpec = serde_json::from_value(sb.data["spec"].clone()).unwrap();
        assert_eq!(spec.shutdown_time.as_deref(), Some("2026-11-27T12:01:30Z"));
        assert_eq!(spec.shutdown_policy, Some(ShutdownPolicy::Delete));
        assert_eq!(sb.data["spec"]["shutdownPolicy"], "Delete");
        // The very pod podjob builds: hardened, runtime class from the isolation.
        assert_eq!(Some(&spec.pod_template.spec), podjob.pod.spec.as_ref());
        assert_eq!(spec.pod_template.spec.runtime_class_name.as_deref(), Some("gvisor"));
        assert_eq!(spec.pod_template.spec.automount_service_account_token, Some(false));
        assert_eq!(spec.pod_template.spec.active_deadline_seconds, Some(7));
        // Its labels, so podjob's default-deny NetworkPolicy selects the Sandbox's pod.
        assert_eq!(Some(&spec.pod_template.metadata.labels), podjob.pod.metadata.labels.as_ref());
        let selector = objs.network_policy.spec.as_ref().unwrap().pod_selector.as_ref().unwrap();
        for (k, v) in selector.match_labels.as_ref().unwrap() {
            assert_eq!(spec.pod_template.metadata.labels.get(k), Some(v), "{k}");
        }
        assert_eq!(objs.config_maps.len(), podjob.config_maps.len());
        // No metadata beyond labels and annotations in the template.
        assert!(sb.data["spec"]["podTemplate"]["metadata"].get("name").is_none());
        // No allowed prefixes: no annotations anywhere.
        assert!(sb.metadata.annotations.is_none());
    }

    #[test]
    fn allowed_annotations_reach_the_sandbox_and_its_pod_template() {
        let mut t = task(None);
        t.spec.labels = BTreeMap::from([
            ("kubesim.agenttask.io/sandbox-ready".to_string(), "never".to_string()),
            ("team".to_string(), "evals".to_string()),
        ]);
        let settings =
            PodSettings { annotation_prefixes: vec!["kubesim.agenttask.io/".into()], ..PodSettings::default() };
        let objs =
            build(&t, &settings, &TaskDefaults::default(), SandboxApiVersion::V1beta1, deadline(), Duration::ZERO)
                .unwrap();
        let want = BTreeMap::from([("kubesim.agenttask.io/sandbox-ready".to_string(), "never".to_string())]);
        assert_eq!(objs.sandbox.metadata.annotations.as_ref(), Some(&want));
        let spec: SandboxSpec = serde_json::from_value(objs.sandbox.data["spec"].clone()).unwrap();
        assert_eq!(spec.pod_template.metadata.annotations, want);
    }

    #[test]
    fn standard_isolation_has_no_runtime_class_and_v1alpha1_is_selectable() {
        let objs = build(
            &task(None),
            &PodSettings::default(),
            &TaskDefaults::default(),
            SandboxApiVersion::V1alpha1,
            deadline(),
            Duration::ZERO,
        )
        .unwrap();
        assert_eq!(objs.sandbox.types.as_ref().unwrap().api_version, "agents.x-k8s.io/v1alpha1");
        assert!(objs.sandbox.data["spec"]["podTemplate"]["spec"].get("runtimeClassName").is_none());
        assert_eq!(objs.sandbox.data["spec"]["shutdownTime"], "2026-11-27T12:00:00Z");
    }

    #[test]
    fn shutdown_time_rounds_up_to_whole_seconds() {
        let d = deadline() + chrono::Duration::milliseconds(1);
        assert_eq!(shutdown_time(d, Duration::from_secs(60)), "2026-11-27T12:01:01Z");
        assert_eq!(shutdown_time(deadline(), Duration::from_secs(3600)), "2026-11-27T13:00:00Z");
    }

    #[test]
    fn claims_name_the_pool_and_expire_with_delete() {
        let meta =
            ObjectMeta { name: Some("at-1-a1".into()), namespace: Some("agenttask".into()), ..ObjectMeta::default() };
        let c = claim(meta.clone(), SandboxApiVersion::V1beta1, "python-pool", "python", "2026-11-27T12:01:30Z".into());
        assert_eq!(c.types.as_ref().unwrap().api_version, "extensions.agents.x-k8s.io/v1beta1");
        assert_eq!(c.types.as_ref().unwrap().kind, "SandboxClaim");
        assert_eq!(
            c.data["spec"],
            serde_json::json!({"warmPoolRef": {"name": "python-pool"},
                "lifecycle": {"shutdownTime": "2026-11-27T12:01:30Z", "shutdownPolicy": "Delete"}})
        );
        let c = claim(meta, SandboxApiVersion::V1alpha1, "python-pool", "python", "2026-11-27T12:01:30Z".into());
        assert_eq!(c.data["spec"]["sandboxTemplateRef"]["name"], "python");
        assert_eq!(c.data["spec"]["warmpool"], "python-pool");
        assert_eq!(api_resource(Kind::SandboxWarmPool, SandboxApiVersion::V1beta1).plural, "sandboxwarmpools");
    }

    #[test]
    fn statuses_parse_as_the_controller_writes_them() {
        let st: SandboxStatus = serde_json::from_value(serde_json::json!({
            "conditions": [{"type": "Ready", "status": "True", "reason": "DependenciesReady", "message": "Pod is Ready",
                "lastTransitionTime": "2026-11-27T12:00:00Z", "observedGeneration": 1}],
            "podIPs": ["10.0.0.1"], "nodeName": "n1", "selector": "agents.x-k8s.io/sandbox-name-hash=0a1b2c3d",
        }))
        .unwrap();
        assert_eq!(st.conditions[0].reason, "DependenciesReady");
        assert_eq!(st.pod_ips, ["10.0.0.1"]);
        let c: SandboxClaimStatus =
            serde_json::from_value(serde_json::json!({"sandbox": {"name": "pool-abcde"}})).unwrap();
        assert_eq!(c.sandbox.name.as_deref(), Some("pool-abcde"));
    }
    fn status(conditions: &[(&str, &str, &str, &str)]) -> SandboxStatus {
        let conditions = conditions
            .iter()
            .map(|(t, s, r, m)| {
                serde_json::json!({"type": t, "status": s, "reason": r, "message": m,
                "lastTransitionTime": "2026-11-27T12:00:00Z"})
            })
            .collect::<Vec<_>>();
        serde_json::from_value(serde_json::json!({ "conditions": conditions })).unwrap()
    }

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({"metadata": {"name": "p"}, "status": status})).unwrap()
    }

    #[test]
    fn observe_follows_the_pod_then_the_conditions() {
        let grace = Duration::from_secs(60);
        let now = deadline();
        let running = pod(serde_json::json!({"phase": "Running", "containerStatuses": [{
            "name": podspec::CONTAINER, "image": "i", "imageID": "", "ready": true, "restartCount": 0,
            "state": {"running": {"startedAt": "2026-11-27T11:59:00Z"}}}]}));
        let ready = status(&[("Ready", "True", "DependenciesReady", "Pod is Ready")]);
        assert!(matches!(observe(&ready, Some(&running), grace, now), Observed::Running { started: Some(_) }));
        let exited = pod(serde_json::json!({"phase": "Failed", "containerStatuses": [{
            "name": podspec::CONTAINER, "image": "i", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": 3, "reason": "Error"}}}]}));
        let finished =
            status(&[("Ready", "False", "PodFailed", "Pod failed"), ("Finished", "True", "PodFailed", "Pod failed")]);
        assert_eq!(
            observe(&finished, Some(&exited), grace, now),
            Observed::Ended { termination: Termination::Exited, exit_code: Some(3), termination_message: None }
        );
        // Expired by agent-sandbox: timed out, whatever the pod last said.
        let expired = status(&[("Ready", "False", "SandboxExpired", "")]);
        assert!(matches!(
            observe(&expired, Some(&running), grace, now),
            Observed::Ended { termination: Termination::TimedOut, .. }
        ));
        assert!(matches!(
            observe(&expired, None, grace, now),
            Observed::Ended { termination: Termination::TimedOut, .. }
        ));
        // Finished but the pod is gone.
        assert!(matches!(
            observe(&finished, None, grace, now),
            Observed::Ended { termination: Termination::PodMissing(m), .. } if m.contains("PodFailed")
        ));
        // The controller cannot make the pod.
        let refused = status(&[("Ready", "False", "ReconcilerError", "Error seen: pods \"p\" is forbidden")]);
        assert!(matches!(
            observe(&refused, None, grace, now),
            Observed::Ended { termination: Termination::BackendError(m), .. } if m.contains("forbidden")
        ));
        // Running but never Ready: noted once the controller has had time to catch up.
        let not_ready = status(&[("Ready", "False", "DependenciesNotReady", "Pod is Running but not Ready")]);
        let since = now - chrono::Duration::seconds(1);
        assert_eq!(not_ready_note(&not_ready, since, now), None, "the controller may lag the pod");
        let note = not_ready_note(&not_ready, since, now + chrono::Duration::seconds(5)).unwrap();
        assert!(note.contains("DependenciesNotReady: Pod is Running but not Ready"), "{note}");
        let later = now + chrono::Duration::seconds(5);
        assert_eq!(not_ready_note(&ready, since, later), None);
        assert_eq!(not_ready_note(&SandboxStatus::default(), since, later), None);
        // Nothing yet.
        let fresh = status(&[("Ready", "False", "DependenciesNotReady", "Pod does not exist")]);
        assert_eq!(observe(&fresh, None, grace, now), Observed::Pending { retry_in: None });
        assert_eq!(observe(&SandboxStatus::default(), None, grace, now), Observed::Pending { retry_in: None });
    }
}
