//! The `AgentTask` custom resource (`agenttasks.agenttask.io/v1alpha1`): the contract between
//! the service, the reconciler and users who `kubectl apply` tasks themselves.
//!
//! The spec mirrors a validated task (see the task message table in the contract); the status
//! is what the reconciler observed. Every rule the API server can enforce from an OpenAPI schema
//! (enums, ranges, patterns, sizes) is declared here, so `deploy/crd.yaml`, generated from this
//! file, refuses malformed objects before anything of ours sees them. The rest (tenant quotas,
//! allowed isolations) is the validator's job, as for tasks that come through RabbitMQ.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::domain::phase::Phase;

/// Group of every resource of ours.
pub const GROUP: &str = "agenttask.io";
/// The finalizer the reconciler puts on every AgentTask it runs.
pub const FINALIZER: &str = "agenttask.io/cleanup";
/// Label on every object the service makes: the AgentTask's name it belongs to.
pub const LABEL_AGENTTASK: &str = "agenttask.io/agenttask";
/// Label: the tenant.
pub const LABEL_TENANT: &str = "agenttask.io/tenant";
/// Label: the task id (uuid) in Postgres.
pub const LABEL_TASK_ID: &str = "agenttask.io/task-id";
/// Label: the batch id, when it is a valid label value.
pub const LABEL_BATCH: &str = "agenttask.io/batch";
/// Label: `app.kubernetes.io/managed-by`, so orphans can be found.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// Value of [`LABEL_MANAGED_BY`].
pub const MANAGER: &str = "agenttask";
/// Inline code larger than this goes into a ConfigMap named in `spec.inputsFrom`.
pub const MAX_INLINE_CODE_BYTES: usize = 256 * 1024;
/// Bound on `status.result` (serialized JSON); larger results are dropped with a message.
pub const MAX_STATUS_RESULT_BYTES: usize = 64 * 1024;
/// Default `ttlSecondsAfterFinished`.
pub const DEFAULT_TTL_SECONDS: u32 = 3600;

/// A task to run: Python or R code with its inputs, limits and isolation.
// kube's `printcolumn(...)` repeats `type_`/`json_path` by design: one column per attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "agenttask.io",
    version = "v1alpha1",
    kind = "AgentTask",
    plural = "agenttasks",
    singular = "agenttask",
    shortname = "at",
    category = "agenttask",
    namespaced,
    status = "AgentTaskStatus",
    doc = "An untrusted Python or R task run in a hardened pod; see https://github.com/agenttask for the contract",
    printcolumn(
        name = "Tenant",
        type_ = "string",
        json_path = ".status.tenant",
        description = "Tenant the task belongs to (from its namespace)"
    ),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Reason", type_ = "string", json_path = ".status.reason"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentTaskSpec {
    /// Tenant, as recorded by the service. Informational: a task's tenant is always decided by
    /// the service (its queue, or its namespace), never by this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"))]
    pub tenant: Option<String>,
    /// `python` or `r`.
    pub language: TaskLanguage,
    /// The program, inline. Empty when it is carried by `inputsFrom`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[schemars(length(max = 262144))]
    pub code: String,
    /// Read-only input files in the working directory, by plain name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64, "propertyNames" = {"pattern": "^[A-Za-z0-9._-]{1,255}$"}))]
    pub files: BTreeMap<String, InputFile>,
    /// ConfigMaps (same namespace) carrying code and files too large to be inline, in order.
    /// Each has a `manifest` key (`TARGET<TAB>KEY` lines) and the parts it names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(regex(pattern = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")))]
    pub inputs_from: Vec<String>,
    /// Standard input of the program.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// Arguments after the script.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub args: Vec<String>,
    /// The program's own environment; names starting `AGENTTASK_` are reserved.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64, "propertyNames" = {"pattern": "^[A-Z_][A-Z0-9_]*$"}))]
    pub env: BTreeMap<String, String>,
    /// CPU and memory; requests equal limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<TaskResources>,
    /// Wall-clock limit; the pod's `activeDeadlineSeconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub timeout_seconds: Option<u32>,
    /// `standard`, or a RuntimeClass name (gvisor, kata, ...) the tenant is allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"))]
    pub isolation: Option<String>,
    /// The backend the service chose (`podjob`, `runtimeclass`, `sandbox`); set by the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<TaskBackend>,
    /// Order among the tenant's own queued tasks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = -100, max = 100))]
    pub priority: Option<i16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Za-z0-9._:-]{1,128}$"))]
    pub batch_id: Option<String>,
    /// The task's labels (not Kubernetes labels: values may be up to 256 bytes).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub labels: BTreeMap<String, String>,
    /// Seconds after finishing before the AgentTask (and its pod) is deleted; default 3600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 31536000))]
    pub ttl_seconds_after_finished: Option<u32>,
    /// Set by the service when the scheduler admitted the task: which run this object is. The
    /// reconciler creates a pod only for an admitted AgentTask.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admission: Option<Admission>,
}

/// The run the scheduler admitted.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Admission {
    /// The task's id in Postgres.
    #[schemars(regex(pattern = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"))]
    pub task_id: String,
    /// The attempt the store handed out; a pod belongs to exactly one attempt.
    #[schemars(range(min = 1))]
    pub attempt: i32,
}

/// The program's language.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TaskLanguage {
    #[default]
    Python,
    R,
}

/// A backend name, as recorded in results.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TaskBackend {
    Podjob,
    Runtimeclass,
    Sandbox,
}

/// One input file: text or base64.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InputFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_base64: Option<String>,
}

/// Kubernetes quantities; capped by the tenant's policy.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskResources {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?m?)$"))]
    pub cpu: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$"))]
    pub memory: Option<String>,
}

/// The CRD schema of a task's phase: the enum of the contract's phases. The phase itself is the
/// domain's [`Phase`], so the status can hold nothing the database and results could not.
impl JsonSchema for Phase {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "TaskPhase".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "The phases of the contract, as the CRD schema's enum.",
            "type": "string",
            "enum": Phase::ALL.map(Phase::as_str),
        })
    }
}

/// What the reconciler observed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentTaskStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// CamelCase reason (`NonZeroExit`, `OOMKilled`, `TimedOut`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[A-Z][A-Za-z]*$"))]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// `Scheduled`, `Running` and `Finished`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<TaskCondition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The program's JSON result, when it wrote one no larger than 64 KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_json")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The run this status describes (`admission.attempt` when it was observed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<i32>,
}

/// A condition in the Kubernetes convention (`type`, `status`, `lastTransitionTime`, ...).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TaskCondition {
    #[serde(rename = "type")]
    #[schemars(extend("enum" = ["Scheduled", "Running", "Finished"]))]
    pub type_: String,
    #[schemars(extend("enum" = ["True", "False", "Unknown"]))]
    pub status: String,
    pub last_transition_time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

fn any_json(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({ "x-kubernetes-preserve-unknown-fields": true })
}

/// The CRD as YAML, exactly as `agenttask crd` prints it and `deploy/crd.yaml` holds it.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let crd = AgentTask::crd();
    let body = serde_saphyr::to_string(&crd).expect("a CRD always serializes");
    format!("# Generated by `agenttask crd` from src/kube/crd.rs; do not edit.\n---\n{body}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    #[test]
    fn names_are_the_contracts() {
        let crd = AgentTask::crd();
        assert_eq!(crd.metadata.name.as_deref(), Some("agenttasks.agenttask.io"));
        assert_eq!(crd.spec.group, GROUP);
        assert_eq!(crd.spec.names.kind, "AgentTask");
        assert_eq!(crd.spec.names.short_names.as_deref(), Some(&["at".to_owned()][..]));
        assert_eq!(crd.spec.scope, "Namespaced");
        let v = &crd.spec.versions[0];
        assert_eq!(v.name, "v1alpha1");
        assert!(v.subresources.as_ref().unwrap().status.is_some());
        let cols: Vec<_> = v.additional_printer_columns.as_ref().unwrap().iter().map(|c| c.name.as_str()).collect();
        assert_eq!(cols, ["Tenant", "Phase", "Reason", "Age"]);
    }

    #[test]
    fn schema_carries_what_the_api_server_can_enforce() {
        let yaml = crd_yaml();
        for needle in [
            "maximum: 100",
            "minimum: -100",
            "maximum: 86400",
            "- python",
            "- Succeeded",
            "x-kubernetes-preserve-unknown-fields: true",
            "maxProperties: 32",
            "^[A-Za-z0-9._:-]{1,128}$",
        ] {
            assert!(yaml.contains(needle), "CRD schema lacks {needle:?}:\n{yaml}");
        }
    }

    /// `deploy/crd.yaml` is generated; regenerate it with `agenttask crd > deploy/crd.yaml`.
    #[test]
    fn deploy_crd_yaml_is_generated_from_this_file() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/crd.yaml");
        let on_disk = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            on_disk == crd_yaml(),
            "deploy/crd.yaml differs from the derived CRD: run `cargo run --bin agenttask -- crd > deploy/crd.yaml`"
        );
    }
}
