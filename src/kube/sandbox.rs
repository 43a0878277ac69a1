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
//! The warm path's other objects and decisions (src/kube/agent-sandbox.md, "Warm path: design"):
//! the pool's [`warm_template`] (podjob's hardened pod running the one-shot task [`AGENT`]), the
//! [`warm_pool`], the per-pool [`pool_network_policy`], which tasks may go warm
//! ([`warm_ineligible`]), whether to claim, wait or go cold ([`pool_decision`]), and the signed
//! hand-over request ([`handoff_request`]) that gives a claimed pod the task's code and inputs.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, SecondsFormat, Utc};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, PodSpec};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use serde::{Deserialize, Serialize};

use k8s_openapi::api::core::v1::{
    ContainerPort, EnvVar, EnvVarSource, ObjectFieldSelector, Probe, SecretKeySelector, TCPSocketAction,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use sha2::{Digest as _, Sha256};

use super::crd::{AgentTask, AgentTaskSpec, TaskLanguage, TaskResources, LABEL_MANAGED_BY, MANAGER};
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

/// Pure: the AgentTask's status message once it has claimed a sandbox of `pool` with `claim`.
pub fn claimed_note(pool: &str, claim: &str) -> String {
    format!("claimed a sandbox of warm pool {pool} (SandboxClaim {claim})")
}

/// Pure: the AgentTask's status message while its claim is bound to `sandbox` but the claim's
/// `Ready` (forwarded from the Sandbox) is not True: the task has not been handed over and waits,
/// `Pending`, at most until its timeout.
pub fn claim_not_ready_note(pool: &str, claim: &str, sandbox: &str, ready: Option<&Condition>) -> String {
    let why = ready.map_or_else(|| "no Ready condition yet".to_owned(), |c| format!("{}: {}", c.reason, c.message));
    format!(
        "claimed sandbox {sandbox} of warm pool {pool} (SandboxClaim {claim}) is not Ready ({why}); the task is \
         handed to it once it is"
    )
}

/// Pure: why a warm task ends `BackendError` when its claimed `sandbox` is still not Ready at its
/// timeout (counted from the claim): its program never started, so `TimedOut` would mislead.
pub fn claim_never_ready(sandbox: &str, timeout_seconds: u32, ready: Option<&Condition>) -> String {
    let why =
        ready.map_or_else(|| "it reported no Ready condition".to_owned(), |c| format!("{}: {}", c.reason, c.message));
    format!(
        "the claimed sandbox {sandbox} never became Ready within the task's timeout of {timeout_seconds}s ({why}); \
         the task was never handed to it and did not run"
    )
}

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

// ---------------------------------------------------------------------------------------------
// The warm path

/// The task agent's TCP port in a pool pod.
pub const AGENT_PORT: i32 = 8470;
/// Label of a warm pool's pods (the template's), selected by the pool's NetworkPolicy.
pub const LABEL_WARM_POOL: &str = "agenttask.io/warm-pool";
/// Annotation on an AgentTask: how its task was launched (`warm POOL`, or `cold: WHY`).
pub const ANNOTATION_LAUNCH: &str = "agenttask.io/launch";
/// Annotation on an AgentTask: the attempt its launch annotations describe (a retry starts afresh).
pub const ANNOTATION_LAUNCH_ATTEMPT: &str = "agenttask.io/launch-attempt";
/// Annotation on an AgentTask waiting for a ready replica: since when (RFC 3339).
pub const ANNOTATION_WAITING_SINCE: &str = "agenttask.io/warm-waiting-since";
/// Annotation on a claim: how far the hand-over got (`connected`, or `done` and its time).
pub const ANNOTATION_HANDOFF: &str = "agenttask.io/handoff";
/// Label on a claim: the pool it draws from (to count the claims not bound yet).
pub const LABEL_CLAIM_POOL: &str = "agenttask.io/warm-pool";
/// The header carrying the request's HMAC-SHA256 (hex) under the pool's token.
pub const SIGNATURE_HEADER: &str = "X-AgentTask-Signature";
/// Env of the agent that it removes before it `exec`s the task.
const AGENT_ENV_PREFIX: &str = "AGENTTASK_AGENT_";

/// The one-shot task agent a pool pod runs (`python3 -c AGENT PORT`): takes one signed
/// `POST /v1/task` for this very pod, writes its files, answers 204 and `exec`s its argv with the
/// cold pod's env plus the task's, dropping its own `AGENTTASK_AGENT_*` variables (the token).
/// Anything else is answered 4xx and it keeps waiting (a readiness probe's bare connect too).
pub const AGENT: &str = r#"import base64,hashlib,hmac,json,os,socket,sys
E=os.environ
K=E.get("AGENTTASK_AGENT_TOKEN","").encode()
IP=E.get("AGENTTASK_AGENT_IP","")
POD=E.get("AGENTTASK_AGENT_POD","")
for k in [k for k in E if k.startswith("AGENTTASK_AGENT_")]:
    del E[k]
if not K or not IP or not POD:
    sys.exit("agenttask agent: AGENTTASK_AGENT_TOKEN, AGENTTASK_AGENT_IP and AGENTTASK_AGENT_POD are required")
LIMIT=64<<20
s=socket.socket(socket.AF_INET6 if ":" in IP else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)
s.bind((IP,int(sys.argv[1])))
s.listen(16)
def answer(c,code,text=""):
    b=text.encode()
    try:
        c.sendall(b"HTTP/1.1 %d -\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"%(code,len(b),b))
    except OSError:
        pass
def take(c):
    c.settimeout(10)
    f=c.makefile("rb")
    if not f.readline(8192).startswith(b"POST /v1/task "):
        return answer(c,404,"only POST /v1/task")
    h={}
    while True:
        x=f.readline(8192)
        if x in (b"",b"\r\n",b"\n"):
            break
        k,_,v=x.decode("latin-1").partition(":")
        h[k.strip().lower()]=v.strip()
    n=int(h.get("content-length","-1"))
    if n<0 or n>LIMIT:
        return answer(c,413,"a body of at most %d bytes is required"%LIMIT)
    body=f.read(n)
    if len(body)!=n:
        return answer(c,400,"short body")
    mac=hmac.new(K,body,hashlib.sha256).hexdigest()
    if not hmac.compare_digest(mac.encode(),h.get("x-agenttask-signature","").encode()):
        return answer(c,401,"bad signature")
    t=json.loads(body)
    if t.get("pod")!=POD:
        return answer(c,403,"not for this pod")
    return t
while True:
    c,_=s.accept()
    try:
        t=take(c)
    except Exception as e:
        t=None
        answer(c,400,"bad request: %s"%e)
    if t:
        break
    c.close()
try:
    w=t["workdir"]
    for x in t["files"]:
        p=os.path.join(w,x["target"])
        os.makedirs(os.path.dirname(p),exist_ok=True)
        with open(p,"wb") as o:
            o.write(base64.b64decode(x["data"]))
except Exception as e:
    answer(c,500,"cannot write the task's files: %s"%e)
    sys.exit(1)
answer(c,204)
c.close()
s.close()
E.update(t["env"])
os.chdir(w)
os.execve(t["argv"][0],t["argv"],E)
"#;

/// The Secret holding a pool's token (key `token`), made by the operator.
pub fn token_secret_name(pool: &str) -> String {
    format!("{pool}-agent-token")
}

/// The per-pool NetworkPolicy's name.
pub fn pool_network_policy_name(pool: &str) -> String {
    format!("agenttask-warm-{pool}")
}

/// The labels of a pool's pods (the template's).
pub fn pool_pod_labels(pool: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(LABEL_WARM_POOL.to_owned(), pool.to_owned()), (LABEL_MANAGED_BY.to_owned(), MANAGER.to_owned())])
}

/// The cpu and memory of a pool's pods: its tenant's defaults, so that a task asking for those
/// (every task that names none) fits it exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolResources {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
}

impl PoolResources {
    fn quantities(&self) -> TaskResources {
        TaskResources { cpu: Some(format!("{}m", self.cpu_millis)), memory: Some(self.memory_bytes.to_string()) }
    }
}

/// The pool's SandboxTemplate: podjob's hardened pod for a Python task of `resources`, whose
/// container runs the task agent instead (listening on the pod's IP, port [`AGENT_PORT`], with a
/// readiness probe on it), without `activeDeadlineSeconds` (a pool pod waits for an unknown time;
/// the task's deadline is the service's and the claim's), and with agent-sandbox's default
/// NetworkPolicy off (`networkPolicyManagement: Unmanaged`: it would allow internet egress; ours
/// is [`pool_network_policy`]).
pub fn warm_template(
    pool: &str,
    namespace: &str,
    settings: &PodSettings,
    resources: &PoolResources,
    version: SandboxApiVersion,
) -> DynamicObject {
    let mut stand_in = AgentTask::new(
        pool,
        AgentTaskSpec {
            language: TaskLanguage::Python,
            code: "pass".into(),
            resources: Some(resources.quantities()),
            ..AgentTaskSpec::default()
        },
    );
    stand_in.metadata.namespace = Some(namespace.to_owned());
    // No artifacts claim: a template cannot mount a task's sub-path (such tasks run cold).
    let settings = PodSettings { artifacts_claim: None, ..settings.clone() };
    let pod = podspec::pod(&stand_in, pool, &[], &settings, &TaskDefaults::default());
    let mut spec = pod.spec.unwrap_or_default();
    spec.active_deadline_seconds = None;
    let c = &mut spec.containers[0];
    c.command = Some(vec!["python3".into(), "-c".into(), AGENT.into()]);
    c.args = Some(vec![AGENT_PORT.to_string()]);
    let field = |path: &str| EnvVarSource {
        field_ref: Some(ObjectFieldSelector { field_path: path.into(), api_version: None }),
        ..EnvVarSource::default()
    };
    let env = c.env.get_or_insert_with(Vec::new);
    env.push(EnvVar {
        name: format!("{AGENT_ENV_PREFIX}TOKEN"),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: token_secret_name(pool),
                key: "token".into(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
    });
    env.push(EnvVar { name: format!("{AGENT_ENV_PREFIX}IP"), value: None, value_from: Some(field("status.podIP")) });
    env.push(EnvVar { name: format!("{AGENT_ENV_PREFIX}POD"), value: None, value_from: Some(field("metadata.name")) });
    c.ports = Some(vec![ContainerPort {
        name: Some("agent".into()),
        container_port: AGENT_PORT,
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    }]);
    c.readiness_probe = Some(Probe {
        tcp_socket: Some(TCPSocketAction { port: IntOrString::Int(AGENT_PORT), host: None }),
        period_seconds: Some(2),
        ..Probe::default()
    });
    let template =
        PodTemplate { metadata: PodMetadata { labels: pool_pod_labels(pool), ..PodMetadata::default() }, spec };
    let meta = ObjectMeta {
        name: Some(pool.to_owned()),
        namespace: Some(namespace.to_owned()),
        labels: Some(BTreeMap::from([(LABEL_MANAGED_BY.to_owned(), MANAGER.to_owned())])),
        ..ObjectMeta::default()
    };
    let spec = serde_json::json!({
        "podTemplate": template,
        "networkPolicyManagement": "Unmanaged",
    });
    dynamic(Kind::SandboxTemplate, version, meta, spec)
}

/// The SandboxWarmPool `pool` of `replicas` sandboxes from the template of the same name.
pub fn warm_pool(pool: &str, namespace: &str, replicas: u32, version: SandboxApiVersion) -> DynamicObject {
    let meta = ObjectMeta {
        name: Some(pool.to_owned()),
        namespace: Some(namespace.to_owned()),
        labels: Some(BTreeMap::from([(LABEL_MANAGED_BY.to_owned(), MANAGER.to_owned())])),
        ..ObjectMeta::default()
    };
    dynamic(
        Kind::SandboxWarmPool,
        version,
        meta,
        serde_json::json!({"replicas": replicas, "sandboxTemplateRef": {"name": pool}}),
    )
}

/// The pool's default-deny policy: its pods have no egress at all, and ingress only to the
/// agent's port from the service's pods (`app.kubernetes.io/name: agenttask` in
/// `service_namespace`).
pub fn pool_network_policy(pool: &str, namespace: &str, service_namespace: &str) -> NetworkPolicy {
    let peer = NetworkPolicyPeer {
        pod_selector: Some(LabelSelector {
            match_labels: Some(BTreeMap::from([("app.kubernetes.io/name".to_owned(), MANAGER.to_owned())])),
            ..LabelSelector::default()
        }),
        namespace_selector: Some(LabelSelector {
            match_labels: Some(BTreeMap::from([(
                "kubernetes.io/metadata.name".to_owned(),
                service_namespace.to_owned(),
            )])),
            ..LabelSelector::default()
        }),
        ip_block: None,
    };
    NetworkPolicy {
        metadata: ObjectMeta {
            name: Some(pool_network_policy_name(pool)),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([(LABEL_MANAGED_BY.to_owned(), MANAGER.to_owned())])),
            ..ObjectMeta::default()
        },
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([(LABEL_WARM_POOL.to_owned(), pool.to_owned())])),
                ..LabelSelector::default()
            }),
            policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                from: Some(vec![peer]),
                ports: Some(vec![NetworkPolicyPort {
                    port: Some(IntOrString::Int(AGENT_PORT)),
                    protocol: Some("TCP".into()),
                    end_port: None,
                }]),
            }]),
            egress: None,
        }),
    }
}

/// Pure: why `task` cannot run in a pool pod of `resources` (`None`: it can). The pool's pods are
/// Python, standard isolation, of the tenant's default resources, and mount nothing of a task's.
pub fn warm_ineligible(task: &AgentTask, resources: &PoolResources, artifacts_claim: bool) -> Option<String> {
    let spec = &task.spec;
    if spec.language != TaskLanguage::Python {
        return Some("the warm pool runs Python tasks only".into());
    }
    if spec.isolation.as_deref().is_some_and(|i| i != "standard") {
        return Some("the warm pool runs tasks of standard isolation only".into());
    }
    if !spec.inputs_from.is_empty() {
        return Some("the task's inputs come from ConfigMaps (spec.inputsFrom), which a pool pod cannot mount".into());
    }
    if artifacts_claim {
        return Some("the artifacts claim cannot be mounted in a pool pod".into());
    }
    let r = spec.resources.clone().unwrap_or_default();
    let cpu = r.cpu.as_deref().map(crate::domain::quantity::parse_cpu_millis);
    let memory = r.memory.as_deref().map(crate::domain::quantity::parse_memory_bytes);
    let fits = cpu.is_none_or(|c| c.ok() == Some(resources.cpu_millis))
        && memory.is_none_or(|m| m.ok() == Some(resources.memory_bytes));
    if !fits {
        return Some(format!(
            "the warm pool's pods have the tenant's default resources ({}m cpu, {} bytes memory) and the task asks \
             for others",
            resources.cpu_millis, resources.memory_bytes
        ));
    }
    None
}

/// What to do with a warm-eligible task, given its pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolDecision {
    /// A replica is free: claim it.
    Claim,
    /// None is: wait (and say so).
    Wait(String),
    /// None is: run cold (and say so).
    Cold(String),
}

/// Pure: claim, wait or go cold, from the pool's `readyReplicas` less the service's claims on it
/// that are not bound yet (each will take one of those replicas).
pub fn pool_decision(
    pool: &str,
    ready_replicas: i64,
    unbound_claims: usize,
    empty: crate::domain::tenant::WarmPoolEmpty,
) -> PoolDecision {
    let free = ready_replicas - unbound_claims as i64;
    if free > 0 {
        return PoolDecision::Claim;
    }
    let counts = format!("{ready_replicas} ready, {unbound_claims} claimed and not bound yet");
    match empty {
        crate::domain::tenant::WarmPoolEmpty::Wait => {
            PoolDecision::Wait(format!("waiting for a ready replica of warm pool {pool} ({counts})"))
        }
        crate::domain::tenant::WarmPoolEmpty::Cold => {
            PoolDecision::Cold(format!("warm pool {pool} had no ready replica ({counts})"))
        }
    }
}

/// HMAC-SHA256 (RFC 2104) of `message` under `key`.
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |b: u8| block.iter().map(|k| k ^ b).collect::<Vec<u8>>();
    let inner = Sha256::new().chain_update(pad(0x36)).chain_update(message).finalize();
    Sha256::new().chain_update(pad(0x5c)).chain_update(inner).finalize().into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The hand-over of `task` to pod `pod`: the JSON body and its signature under `token`. The
/// argv and env are the very ones the cold pod's container would have (podjob's entry script
/// and runtime), the files its inputs, so the claimed pod then runs exactly as a cold one.
pub fn handoff_request(
    task: &AgentTask,
    settings: &PodSettings,
    defaults: &TaskDefaults,
    pod: &str,
    token: &[u8],
) -> Result<(Vec<u8>, String), BuildError> {
    let objs = podspec::build(task, settings, defaults)?;
    let c = objs.pod.spec.as_ref().map(|s| s.containers[0].clone()).unwrap_or_default();
    let mut argv = c.command.unwrap_or_default();
    argv.extend(c.args.unwrap_or_default());
    let env: BTreeMap<String, String> =
        c.env.unwrap_or_default().into_iter().filter_map(|e| Some((e.name, e.value?))).collect();
    let b64 = base64::engine::general_purpose::STANDARD;
    let files: Vec<serde_json::Value> = podspec::inline_inputs(task)?
        .into_iter()
        .map(|i| serde_json::json!({"target": i.target, "data": base64::Engine::encode(&b64, &i.bytes)}))
        .collect();
    let body = serde_json::to_vec(&serde_json::json!({
        "pod": pod, "files": files, "argv": argv, "env": env, "workdir": podspec::SCRATCH,
    }))
    .expect("a hand-over serializes");
    let signature = hex(&hmac_sha256(token, &body));
    Ok((body, signature))
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

    fn resources() -> PoolResources {
        PoolResources { cpu_millis: 500, memory_bytes: 256 << 20 }
    }

    #[test]
    fn hmac_matches_rfc_4231() {
        // RFC 4231, test cases 2 and 6 (a key longer than the block).
        assert_eq!(
            hex(&hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(
            hex(&hmac_sha256(&[0xaa; 131], b"Test Using Larger Than Block-Size Key - Hash Key First")),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn the_template_is_podjobs_pod_running_the_agent() {
        let settings = PodSettings { artifacts_claim: Some("arts".into()), ..PodSettings::default() };
        let t = warm_template("py", "agenttask", &settings, &resources(), SandboxApiVersion::V1beta1);
        assert_eq!(t.types.as_ref().unwrap().kind, "SandboxTemplate");
        assert_eq!(t.data["spec"]["networkPolicyManagement"], "Unmanaged");
        let pt: PodTemplate = serde_json::from_value(t.data["spec"]["podTemplate"].clone()).unwrap();
        assert_eq!(pt.metadata.labels[LABEL_WARM_POOL], "py");
        let spec = pt.spec;
        assert_eq!(spec.active_deadline_seconds, None, "a pool pod waits for an unknown time");
        assert_eq!(spec.automount_service_account_token, Some(false));
        assert_eq!(spec.security_context.as_ref().unwrap().run_as_non_root, Some(true));
        assert!(spec
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .all(|v| v.persistent_volume_claim.is_none() && v.config_map.is_none()));
        let c = &spec.containers[0];
        assert_eq!(c.command.as_ref().unwrap()[..2], ["python3".to_string(), "-c".to_string()]);
        assert_eq!(c.args.as_ref().unwrap(), &[AGENT_PORT.to_string()]);
        assert_eq!(c.security_context.as_ref().unwrap().read_only_root_filesystem, Some(true));
        assert_eq!(c.ports.as_ref().unwrap()[0].container_port, AGENT_PORT);
        let limits = c.resources.as_ref().unwrap().limits.as_ref().unwrap();
        assert_eq!((limits["cpu"].0.as_str(), limits["memory"].0.as_str()), ("500m", "268435456"));
        let env = c.env.as_ref().unwrap();
        let token = env.iter().find(|e| e.name == "AGENTTASK_AGENT_TOKEN").unwrap();
        assert_eq!(token.value, None, "the token is only referenced");
        assert_eq!(token.value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap().name, "py-agent-token");
        assert!(env.iter().any(|e| e.name == "AGENTTASK_RESULT_FILE"));
        let pool = warm_pool("py", "agenttask", 3, SandboxApiVersion::V1beta1);
        assert_eq!(pool.data["spec"], serde_json::json!({"replicas": 3, "sandboxTemplateRef": {"name": "py"}}));
    }

    #[test]
    fn the_pool_policy_denies_egress_and_admits_only_the_service_to_the_agent() {
        let np = pool_network_policy("py", "agenttask", "agenttask-system");
        let spec = np.spec.unwrap();
        assert_eq!(spec.policy_types.unwrap(), ["Ingress", "Egress"]);
        assert!(spec.egress.is_none(), "no egress rule: all egress denied");
        assert_eq!(spec.pod_selector.unwrap().match_labels.unwrap()[LABEL_WARM_POOL], "py");
        let ingress = spec.ingress.unwrap();
        assert_eq!(ingress.len(), 1);
        let from = &ingress[0].from.as_ref().unwrap()[0];
        assert_eq!(
            from.pod_selector.as_ref().unwrap().match_labels.as_ref().unwrap()["app.kubernetes.io/name"],
            "agenttask"
        );
        assert_eq!(
            from.namespace_selector.as_ref().unwrap().match_labels.as_ref().unwrap()["kubernetes.io/metadata.name"],
            "agenttask-system"
        );
        assert_eq!(ingress[0].ports.as_ref().unwrap()[0].port, Some(IntOrString::Int(AGENT_PORT)));
    }

    #[test]
    fn only_python_standard_default_sized_tasks_go_warm() {
        let mut t = task(None);
        t.spec.resources = None;
        assert_eq!(warm_ineligible(&t, &resources(), false), None);
        t.spec.resources = Some(TaskResources { cpu: Some("0.5".into()), memory: Some("256Mi".into()) });
        assert_eq!(warm_ineligible(&t, &resources(), false), None, "the same amounts, written otherwise");
        assert!(warm_ineligible(&t, &resources(), true).unwrap().contains("artifacts"));
        t.spec.resources = Some(TaskResources { cpu: Some("1".into()), memory: None });
        assert!(warm_ineligible(&t, &resources(), false).unwrap().contains("default resources"));
        let mut r = task(None);
        r.spec.resources = None;
        r.spec.language = TaskLanguage::R;
        assert!(warm_ineligible(&r, &resources(), false).unwrap().contains("Python"));
        assert!(warm_ineligible(&task(Some("gvisor")), &resources(), false).unwrap().contains("isolation"));
    }

    #[test]
    fn the_pool_decision_counts_unbound_claims() {
        use crate::domain::tenant::WarmPoolEmpty;
        assert_eq!(pool_decision("py", 2, 1, WarmPoolEmpty::Wait), PoolDecision::Claim);
        match pool_decision("py", 2, 2, WarmPoolEmpty::Wait) {
            PoolDecision::Wait(m) => assert!(m.contains("waiting for a ready replica of warm pool py"), "{m}"),
            d => panic!("{d:?}"),
        }
        match pool_decision("py", 0, 0, WarmPoolEmpty::Cold) {
            PoolDecision::Cold(m) => {
                assert_eq!(m, "warm pool py had no ready replica (0 ready, 0 claimed and not bound yet)")
            }
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn the_handoff_carries_the_cold_pods_command_and_is_signed() {
        let mut t = task(None);
        t.spec.stdin = Some("in".into());
        t.spec.env = BTreeMap::from([("A".to_string(), "1".to_string())]);
        t.spec.args = vec!["x".into()];
        let (body, sig) =
            handoff_request(&t, &PodSettings::default(), &TaskDefaults::default(), "py-abcde", b"k").unwrap();
        assert_eq!(sig, hex(&hmac_sha256(b"k", &body)));
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["pod"], "py-abcde");
        assert_eq!(v["workdir"], podspec::SCRATCH);
        let cold = podspec::build(&t, &PodSettings::default(), &TaskDefaults::default()).unwrap().pod;
        let c = &cold.spec.unwrap().containers[0];
        let mut argv = c.command.clone().unwrap();
        argv.extend(c.args.clone().unwrap());
        assert_eq!(v["argv"], serde_json::json!(argv));
        assert_eq!(v["env"]["A"], "1");
        assert_eq!(v["env"]["AGENTTASK_RESULT_FILE"], format!("{}/result.json", podspec::SCRATCH));
        let b64 = base64::engine::general_purpose::STANDARD;
        let files: BTreeMap<String, Vec<u8>> = v["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                let data = base64::Engine::decode(&b64, f["data"].as_str().unwrap()).unwrap();
                (f["target"].as_str().unwrap().to_owned(), data)
            })
            .collect();
        assert_eq!(files["work/main.py"], b"print(1)");
        assert_eq!(files["stdin"], b"in");
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

    #[test]
    fn a_claimed_sandbox_that_is_not_ready_is_explained_while_waiting_and_at_the_end() {
        let not_ready = status(&[("Ready", "False", "DependenciesNotReady", "Pod is Running but not Ready")]);
        let ready = not_ready.condition("Ready");
        let note = claim_not_ready_note("py", "t-a1", "py-x1", ready);
        assert_eq!(
            note,
            "claimed sandbox py-x1 of warm pool py (SandboxClaim t-a1) is not Ready (DependenciesNotReady: Pod is \
             Running but not Ready); the task is handed to it once it is"
        );
        assert!(claim_not_ready_note("py", "t-a1", "py-x1", None).contains("(no Ready condition yet)"));
        let end = claim_never_ready("py-x1", 30, ready);
        assert_eq!(
            end,
            "the claimed sandbox py-x1 never became Ready within the task's timeout of 30s (DependenciesNotReady: \
             Pod is Running but not Ready); the task was never handed to it and did not run"
        );
        assert!(claim_never_ready("py-x1", 30, None).contains("(it reported no Ready condition)"));
        assert_eq!(claimed_note("py", "t-a1"), "claimed a sandbox of warm pool py (SandboxClaim t-a1)");
    }
}
