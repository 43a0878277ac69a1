//! Pure builders: an [`AgentTask`] and the pod settings in, the Kubernetes objects it becomes
//! out (input ConfigMaps, a default-deny NetworkPolicy, the hardened Pod). No I/O: the
//! reconciler applies what these return, and `agenttask render` prints the very same objects.
//!
//! The pod is built to pass the Pod Security Standard "restricted" profile and more: a fixed
//! non-root uid/gid, a read-only root filesystem, no privilege escalation, every capability
//! dropped, the runtime's default seccomp profile, no service-account token, no service links,
//! no host namespaces or hostPath, requests equal to limits, `activeDeadlineSeconds` from the
//! timeout, and a size-limited scratch `emptyDir` as the only writable place, except for the
//! artifacts directory when an artifacts claim is configured: then it is the task's own
//! sub-path of that PersistentVolumeClaim (see [`crate::exec::artifacts::PvcSink`]).
//!
//! Inputs (code, files, stdin) travel in ConfigMaps of at most [`CONFIGMAP_CHUNK_BYTES`] each:
//! a file larger than that is split into parts over several ConfigMaps and put back together
//! by the pod's entry script, which follows each ConfigMap's `manifest` (`TARGET<TAB>KEY`).
//! Outputs come back through the container log: stdout as is (capped), then a delimited
//! stderr section, then the result (in the termination message when it fits in 4 KiB,
//! otherwise in a delimited section of the log). [`parse_log`] takes that apart again.

use std::collections::BTreeMap;

use base64::Engine as _;
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, EmptyDirVolumeSource, EnvVar,
    PersistentVolumeClaimVolumeSource, Pod, PodSecurityContext, PodSpec, ResourceRequirements, SeccompProfile,
    SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicySpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::ByteString;
use kube::Resource;

use super::crd::{
    AgentTask, TaskLanguage, LABEL_AGENTTASK, LABEL_BATCH, LABEL_MANAGED_BY, LABEL_TASK_ID, LABEL_TENANT, MANAGER,
};

/// Raw bytes per input ConfigMap: under the API server's 1 MiB per ConfigMap, with room for
/// the keys and the manifest.
pub const CONFIGMAP_CHUNK_BYTES: usize = 768 * 1024;
/// The termination message Kubernetes keeps (4 KiB); a larger result goes through the log.
pub const TERMINATION_MESSAGE_BYTES: usize = 4096;
/// Marks the start of the stderr section in the container log.
pub const STDERR_MARK: &str = "\n==agenttask:stderr==\n";
/// Marks the start of the result section in the container log (a result over 4 KiB).
pub const RESULT_MARK: &str = "\n==agenttask:result==\n";
/// The task container's name.
pub const CONTAINER: &str = "task";
/// Where the scratch volume is mounted; the working directory is `work/` below it.
pub const SCRATCH: &str = "/agenttask/scratch";
/// The task's artifacts directory (`$AGENTTASK_ARTIFACTS_DIR`), on the scratch or, with an
/// artifacts claim, the claim's per-task sub-path mounted there.
pub const ARTIFACTS_DIR: &str = "/agenttask/scratch/artifacts";
/// The name of the artifacts claim's volume in a task pod.
pub const ARTIFACTS_VOLUME: &str = "artifacts";

/// Settings of the pods the reconciler makes. Defaults are documented in the README.
#[derive(Debug, Clone, PartialEq)]
pub struct PodSettings {
    /// Image for `python` tasks; must have `/bin/sh`, `dd`, `head` and `python3`.
    pub python_image: String,
    /// Image for `r` tasks; must have `/bin/sh`, `dd`, `head` and `Rscript`.
    pub r_image: String,
    /// The fixed non-root uid and gid every task runs as.
    pub uid: i64,
    pub gid: i64,
    /// `sizeLimit` of the scratch emptyDir (working dir, temp, artifacts, stderr).
    pub scratch_bytes: u64,
    /// Cap on each of stdout and stderr, as for the local backend.
    pub output_limit_bytes: usize,
    /// Cap on the result document.
    pub result_max_bytes: usize,
    /// Task label keys with these prefixes are copied to the pod as annotations (none by
    /// default: a tenant must not be able to annotate pods). Operators can allow e.g. a
    /// cluster tool's prefix; the tests allow the emulator's `kubesim.agenttask.io/`.
    pub annotation_prefixes: Vec<String>,
    /// `imagePullPolicy` of task pods.
    pub image_pull_policy: String,
    /// The PersistentVolumeClaim whose per-task sub-path is the artifacts directory; `None`
    /// keeps artifacts on the scratch, where they are lost with the pod.
    pub artifacts_claim: Option<String>,
}

impl Default for PodSettings {
    fn default() -> Self {
        PodSettings {
            python_image: "python:3.12-slim".into(),
            r_image: "r-base:4.4.1".into(),
            uid: 65532,
            gid: 65532,
            scratch_bytes: 512 << 20,
            output_limit_bytes: 1 << 20,
            result_max_bytes: 1 << 20,
            annotation_prefixes: Vec::new(),
            image_pull_policy: "IfNotPresent".into(),
            artifacts_claim: None,
        }
    }
}

/// Every object one AgentTask becomes.
#[derive(Debug, Clone)]
pub struct TaskObjects {
    pub config_maps: Vec<ConfigMap>,
    pub network_policy: NetworkPolicy,
    pub pod: Pod,
}

/// Why an AgentTask cannot be turned into a pod.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    #[error("the AgentTask has no name or namespace")]
    Unnamed,
    #[error("input file {0:?}: contentBase64 is not valid base64")]
    BadBase64(String),
    #[error("input file {0:?} must have exactly one of content or contentBase64")]
    BadFile(String),
    #[error("the AgentTask has no code (neither spec.code nor spec.inputsFrom)")]
    NoCode,
}

/// Label key of the batch id (re-exported for the materializer).
pub const LABEL_BATCH_KEY: &str = LABEL_BATCH;

/// Names of the objects of AgentTask `name`.
pub fn pod_name(name: &str, attempt: i32) -> String {
    format!("{name}-a{attempt}")
}
pub fn network_policy_name(name: &str) -> String {
    format!("{name}-deny-all")
}
pub fn input_config_map_name(name: &str, i: usize) -> String {
    format!("{name}-in-{i:02}")
}

/// The script file name for a language.
pub fn script_name(language: TaskLanguage) -> &'static str {
    match language {
        TaskLanguage::Python => "main.py",
        TaskLanguage::R => "main.R",
    }
}

/// One named input, bytes and all, in the order it is written.
pub struct Input {
    /// Relative to the scratch directory: `work/<name>` or `stdin`.
    pub target: String,
    pub bytes: Vec<u8>,
}

/// The inputs of a task's inline spec: its code, its files and its stdin.
pub fn inline_inputs(task: &AgentTask) -> Result<Vec<Input>, BuildError> {
    let spec = &task.spec;
    let mut inputs = Vec::new();
    if !spec.code.is_empty() {
        inputs.push(Input {
            target: format!("work/{}", script_name(spec.language)),
            bytes: spec.code.clone().into_bytes(),
        });
    } else if spec.inputs_from.is_empty() {
        return Err(BuildError::NoCode);
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    for (name, file) in &spec.files {
        let bytes = match (&file.content, &file.content_base64) {
            (Some(t), None) => t.clone().into_bytes(),
            (None, Some(e)) => b64.decode(e.trim()).map_err(|_| BuildError::BadBase64(name.clone()))?,
            _ => return Err(BuildError::BadFile(name.clone())),
        };
        inputs.push(Input { target: format!("work/{name}"), bytes });
    }
    if let Some(stdin) = &spec.stdin {
        inputs.push(Input { target: "stdin".into(), bytes: stdin.clone().into_bytes() });
    }
    Ok(inputs)
}

/// Packs inputs into ConfigMap payloads of at most `chunk` bytes each: `binaryData` parts
/// `p<N>` and a `manifest` naming, line by line, which part is appended to which target.
/// Empty inputs still get a manifest line (with an empty part) so the file exists.
pub fn pack(inputs: &[Input], chunk: usize) -> Vec<(String, BTreeMap<String, Vec<u8>>)> {
    let mut out: Vec<(String, BTreeMap<String, Vec<u8>>)> = vec![(String::new(), BTreeMap::new())];
    let mut used = 0usize;
    let mut part = 0usize;
    for input in inputs {
        let mut rest: &[u8] = &input.bytes;
        loop {
            if used >= chunk {
                out.push((String::new(), BTreeMap::new()));
                used = 0;
            }
            let take = rest.len().min(chunk - used);
            let key = format!("p{part}");
            part += 1;
            let (manifest, parts) = out.last_mut().expect("never empty");
            manifest.push_str(&format!("{}\t{key}\n", input.target));
            parts.insert(key, rest[..take].to_vec());
            used += take;
            rest = &rest[take..];
            if rest.is_empty() {
                break;
            }
        }
    }
    out
}

/// A ConfigMap holding one packed payload.
pub fn input_config_map(meta: ObjectMeta, manifest: String, parts: BTreeMap<String, Vec<u8>>) -> ConfigMap {
    ConfigMap {
        metadata: meta,
        data: Some(BTreeMap::from([("manifest".to_owned(), manifest)])),
        binary_data: Some(parts.into_iter().map(|(k, v)| (k, ByteString(v))).collect()),
        immutable: Some(true),
    }
}

/// Labels every object of this AgentTask carries.
pub fn labels_of(task: &AgentTask) -> BTreeMap<String, String> {
    let name = task.metadata.name.clone().unwrap_or_default();
    let mut labels =
        BTreeMap::from([(LABEL_AGENTTASK.to_owned(), name), (LABEL_MANAGED_BY.to_owned(), MANAGER.to_owned())]);
    if let Some(t) = task.status.as_ref().and_then(|s| s.tenant.clone()).or_else(|| task.spec.tenant.clone()) {
        labels.insert(LABEL_TENANT.to_owned(), t);
    }
    if let Some(a) = &task.spec.admission {
        labels.insert(LABEL_TASK_ID.to_owned(), a.task_id.clone());
    }
    if let Some(b) = task.spec.batch_id.as_deref().filter(|b| is_label_value(b)) {
        labels.insert(LABEL_BATCH.to_owned(), b.to_owned());
    }
    labels
}

/// Whether `v` is a valid Kubernetes label value.
pub fn is_label_value(v: &str) -> bool {
    v.len() <= 63
        && (v.is_empty()
            || (v.starts_with(|c: char| c.is_ascii_alphanumeric())
                && v.ends_with(|c: char| c.is_ascii_alphanumeric())
                && v.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))))
}

/// The owner reference to `task`, when it has been stored (a rendered task has no uid).
pub fn owner_of(task: &AgentTask) -> Option<OwnerReference> {
    task.controller_owner_ref(&())
}

fn child_meta(task: &AgentTask, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: task.metadata.namespace.clone(),
        labels: Some(labels_of(task)),
        owner_references: owner_of(task).map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

/// The whole set of objects for `task`. `external_inputs` are the ConfigMaps named in
/// `spec.inputsFrom`, mounted after the task's own.
pub fn build(task: &AgentTask, settings: &PodSettings, defaults: &TaskDefaults) -> Result<TaskObjects, BuildError> {
    let name = task.metadata.name.clone().ok_or(BuildError::Unnamed)?;
    task.metadata.namespace.as_ref().ok_or(BuildError::Unnamed)?;
    let inputs = inline_inputs(task)?;
    let config_maps: Vec<ConfigMap> = pack(&inputs, CONFIGMAP_CHUNK_BYTES)
        .into_iter()
        .enumerate()
        .map(|(i, (manifest, parts))| {
            input_config_map(child_meta(task, input_config_map_name(&name, i)), manifest, parts)
        })
        .collect();
    let mut cm_names: Vec<String> = config_maps.iter().filter_map(|c| c.metadata.name.clone()).collect();
    cm_names.extend(task.spec.inputs_from.iter().cloned());
    Ok(TaskObjects {
        network_policy: network_policy(task, &name),
        pod: pod(task, &name, &cm_names, settings, defaults),
        config_maps,
    })
}

/// Values a spec may leave out (an AgentTask applied directly); the service's own are complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskDefaults {
    pub timeout_seconds: u32,
    pub cpu: String,
    pub memory: String,
}

impl Default for TaskDefaults {
    fn default() -> Self {
        TaskDefaults { timeout_seconds: 30, cpu: "500m".into(), memory: "256Mi".into() }
    }
}

/// Denies all ingress and egress of the task's pod.
pub fn network_policy(task: &AgentTask, name: &str) -> NetworkPolicy {
    NetworkPolicy {
        metadata: child_meta(task, network_policy_name(name)),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([(LABEL_AGENTTASK.to_owned(), name.to_owned())])),
                ..LabelSelector::default()
            }),
            policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
            ingress: None,
            egress: None,
        }),
    }
}

/// The entry script: puts the inputs together in the scratch directory, runs the program with
/// stdout capped, then appends the stderr section and the result. The cap is `dd`, not `head`:
/// `head` buffers what it passes on until it exits, and the pod's log is followed live.
fn entry_script(cap: usize, result_max: usize) -> String {
    let stderr_mark = STDERR_MARK.trim_matches('\n');
    let result_mark = RESULT_MARK.trim_matches('\n');
    format!(
        r#"set -u
umask 077
S={SCRATCH}
mkdir -p "$S/work" "$S/tmp" "$S/artifacts" || exit 125
for d in /agenttask/in/*/; do
  [ -f "${{d}}manifest" ] || continue
  while IFS="$(printf '\t')" read -r target key; do
    cat "$d$key" >> "$S/$target" || exit 125
  done < "${{d}}manifest"
done
[ -f "$S/stdin" ] || : > "$S/stdin"
cd "$S/work" || exit 125
{{ "$@" < "$S/stdin" 2> "$S/stderr"; echo $? > "$S/exit"; }} | dd bs=65536 iflag=count_bytes count={out} status=none
code=$(cat "$S/exit" 2>/dev/null || echo 141)
printf '\n{stderr_mark}\n'
head -c {out} "$S/stderr"
if [ -f "$AGENTTASK_RESULT_FILE" ]; then
  size=$(wc -c < "$AGENTTASK_RESULT_FILE")
  if [ "$size" -le {tm} ]; then
    cat "$AGENTTASK_RESULT_FILE" > /dev/termination-log
  else
    printf '\n{result_mark}\n'
    head -c {result} "$AGENTTASK_RESULT_FILE"
  fi
fi
exit "$code"
"#,
        out = cap + 1,
        tm = TERMINATION_MESSAGE_BYTES,
        result = result_max + 1,
    )
}

/// The artifacts claim and the task's sub-path of it, when a claim is configured and the task
/// is an admitted one of a known tenant (only those have a run to collect).
pub fn artifacts_mount(task: &AgentTask, settings: &PodSettings) -> Option<(String, String)> {
    let claim = settings.artifacts_claim.clone()?;
    let (tenant, task_id) = run_of(task)?;
    Some((claim, crate::exec::artifacts::run_sub_path(&tenant, task_id)?))
}

/// The tenant and task id of an admitted AgentTask.
pub fn run_of(task: &AgentTask) -> Option<(String, uuid::Uuid)> {
    let tenant = task.status.as_ref().and_then(|s| s.tenant.clone()).or_else(|| task.spec.tenant.clone())?;
    let task_id = task.spec.admission.as_ref()?.task_id.parse().ok()?;
    Some((tenant, task_id))
}

/// The hardened pod.
pub fn pod(
    task: &AgentTask,
    name: &str,
    input_config_maps: &[String],
    settings: &PodSettings,
    defaults: &TaskDefaults,
) -> Pod {
    let spec = &task.spec;
    let (image, interpreter) = match spec.language {
        TaskLanguage::Python => (&settings.python_image, vec!["python3".to_owned(), "-u".to_owned()]),
        TaskLanguage::R => (&settings.r_image, vec!["Rscript".to_owned(), "--vanilla".to_owned()]),
    };
    let mut args = vec!["agenttask".to_owned()];
    args.extend(interpreter);
    args.push(script_name(spec.language).to_owned());
    args.extend(spec.args.iter().cloned());
    let res = spec.resources.clone().unwrap_or_default();
    let amounts = BTreeMap::from([
        ("cpu".to_owned(), Quantity(res.cpu.unwrap_or_else(|| defaults.cpu.clone()))),
        ("memory".to_owned(), Quantity(res.memory.unwrap_or_else(|| defaults.memory.clone()))),
    ]);
    let mut env: Vec<EnvVar> = spec
        .env
        .iter()
        .filter(|(k, _)| !k.starts_with("AGENTTASK_"))
        .map(|(k, v)| EnvVar { name: k.clone(), value: Some(v.clone()), value_from: None })
        .collect();
    for (k, v) in [
        ("AGENTTASK_RESULT_FILE", format!("{SCRATCH}/result.json")),
        ("AGENTTASK_ARTIFACTS_DIR", ARTIFACTS_DIR.to_owned()),
        ("HOME", format!("{SCRATCH}/tmp")),
        ("TMPDIR", format!("{SCRATCH}/tmp")),
    ] {
        env.retain(|e| e.name != k);
        env.push(EnvVar { name: k.to_owned(), value: Some(v), value_from: None });
    }
    let mut mounts = vec![VolumeMount { name: "scratch".into(), mount_path: SCRATCH.into(), ..VolumeMount::default() }];
    let mut volumes = vec![Volume {
        name: "scratch".into(),
        empty_dir: Some(EmptyDirVolumeSource {
            size_limit: Some(Quantity(settings.scratch_bytes.to_string())),
            ..EmptyDirVolumeSource::default()
        }),
        ..Volume::default()
    }];
    for (i, cm) in input_config_maps.iter().enumerate() {
        let vol = format!("in-{i:02}");
        mounts.push(VolumeMount {
            name: vol.clone(),
            mount_path: format!("/agenttask/in/{i:02}"),
            read_only: Some(true),
            ..VolumeMount::default()
        });
        volumes.push(Volume {
            name: vol,
            config_map: Some(ConfigMapVolumeSource {
                name: cm.clone(),
                default_mode: Some(0o444),
                optional: Some(false),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        });
    }
    if let Some((claim, sub_path)) = artifacts_mount(task, settings) {
        // Mounted over the scratch's `artifacts/` (mounts nest by path): the program's view
        // and the entry script are the same with and without a claim.
        mounts.push(VolumeMount {
            name: ARTIFACTS_VOLUME.into(),
            mount_path: ARTIFACTS_DIR.into(),
            sub_path: Some(sub_path),
            ..VolumeMount::default()
        });
        volumes.push(Volume {
            name: ARTIFACTS_VOLUME.into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource { claim_name: claim, read_only: None }),
            ..Volume::default()
        });
    }
    let isolation = spec.isolation.as_deref().filter(|i| *i != "standard");
    let annotations: BTreeMap<String, String> = spec
        .labels
        .iter()
        .filter(|(k, _)| settings.annotation_prefixes.iter().any(|p| !p.is_empty() && k.starts_with(p.as_str())))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let attempt = spec.admission.as_ref().map_or(1, |a| a.attempt);
    let mut meta = child_meta(task, pod_name(name, attempt));
    if !annotations.is_empty() {
        meta.annotations = Some(annotations);
    }
    Pod {
        metadata: meta,
        spec: Some(PodSpec {
            restart_policy: Some("Never".into()),
            active_deadline_seconds: Some(i64::from(spec.timeout_seconds.unwrap_or(defaults.timeout_seconds))),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            host_network: Some(false),
            host_pid: Some(false),
            host_ipc: Some(false),
            host_users: None,
            runtime_class_name: isolation.map(str::to_owned),
            termination_grace_period_seconds: Some(5),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(settings.uid),
                run_as_group: Some(settings.gid),
                fs_group: Some(settings.gid),
                seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), localhost_profile: None }),
                ..PodSecurityContext::default()
            }),
            containers: vec![Container {
                name: CONTAINER.into(),
                image: Some(image.clone()),
                image_pull_policy: Some(settings.image_pull_policy.clone()),
                command: Some(vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    entry_script(settings.output_limit_bytes, settings.result_max_bytes),
                ]),
                args: Some(args),
                env: Some(env),
                working_dir: Some(SCRATCH.to_string()),
                resources: Some(ResourceRequirements {
                    limits: Some(amounts.clone()),
                    requests: Some(amounts),
                    claims: None,
                }),
                security_context: Some(SecurityContext {
                    allow_privilege_escalation: Some(false),
                    privileged: Some(false),
                    read_only_root_filesystem: Some(true),
                    run_as_non_root: Some(true),
                    run_as_user: Some(settings.uid),
                    run_as_group: Some(settings.gid),
                    capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), add: None }),
                    seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), localhost_profile: None }),
                    ..SecurityContext::default()
                }),
                termination_message_path: Some("/dev/termination-log".into()),
                termination_message_policy: Some("File".into()),
                volume_mounts: Some(mounts),
                ..Container::default()
            }],
            volumes: Some(volumes),
            ..PodSpec::default()
        }),
        status: None,
    }
}

/// The task's output, taken apart from the container log and termination message.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ParsedLog {
    pub stdout: Vec<u8>,
    pub stdout_truncated: bool,
    pub stderr: Vec<u8>,
    pub stderr_truncated: bool,
    /// The result document's bytes, from the log section or the termination message.
    pub result: Option<Vec<u8>>,
    pub result_truncated: bool,
}

fn rfind(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).rposition(|w| w == needle)
}

/// Splits a container log written by the entry script. The program controls what it prints,
/// so the *last* marks count; it can only confuse its own output. A log without the stderr
/// mark (the script never got there: killed, or a simulated kubelet) is all stdout.
pub fn parse_log(log: &[u8], termination_message: Option<&str>, cap: usize, result_max: usize) -> ParsedLog {
    let mut p = ParsedLog::default();
    let (body, result) = match rfind(log, RESULT_MARK.as_bytes()) {
        Some(i) if rfind(&log[..i], STDERR_MARK.as_bytes()).is_some() => {
            (&log[..i], Some(&log[i + RESULT_MARK.len()..]))
        }
        _ => (log, None),
    };
    match rfind(body, STDERR_MARK.as_bytes()) {
        Some(i) => {
            p.stdout = body[..i].to_vec();
            p.stderr = body[i + STDERR_MARK.len()..].to_vec();
        }
        None => p.stdout = body.to_vec(),
    }
    if p.stdout.len() > cap {
        p.stdout.truncate(cap);
        p.stdout_truncated = true;
    }
    if p.stderr.len() > cap {
        p.stderr.truncate(cap);
        p.stderr_truncated = true;
    }
    if let Some(r) = result {
        let mut r = r.to_vec();
        if r.len() > result_max {
            r.truncate(result_max);
            p.result_truncated = true;
        }
        p.result = Some(r);
    } else if let Some(m) = termination_message.filter(|m| !m.is_empty()) {
        p.result = Some(m.as_bytes().to_vec());
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kube::crd::{AgentTaskSpec, InputFile, TaskResources};

    fn task() -> AgentTask {
        let mut t = AgentTask::new(
            "at-1",
            AgentTaskSpec {
                tenant: Some("acme".into()),
                code: "print(1)".into(),
                files: BTreeMap::from([(
                    "data.csv".into(),
                    InputFile { content: Some("a,b\n".into()), content_base64: None },
                )]),
                stdin: Some("in".into()),
                timeout_seconds: Some(7),
                resources: Some(TaskResources { cpu: Some("250m".into()), memory: Some("128Mi".into()) }),
                batch_id: Some("b-1".into()),
                labels: BTreeMap::from([
                    ("kubesim.agenttask.io/outcome".into(), "OOMKilled".into()),
                    ("team".into(), "x".into()),
                ]),
                ..AgentTaskSpec::default()
            },
        );
        t.metadata.namespace = Some("agenttask".into());
        t.metadata.uid = Some("0000-uid".into());
        t
    }

    #[test]
    fn pod_is_restricted_and_bounded() {
        let objs = build(&task(), &PodSettings::default(), &TaskDefaults::default()).unwrap();
        let pod = objs.pod.spec.unwrap();
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
        assert_eq!(pod.active_deadline_seconds, Some(7));
        assert_eq!(pod.automount_service_account_token, Some(false));
        assert_eq!(pod.enable_service_links, Some(false));
        assert_eq!(pod.runtime_class_name, None);
        let psc = pod.security_context.unwrap();
        assert_eq!((psc.run_as_non_root, psc.run_as_user, psc.run_as_group), (Some(true), Some(65532), Some(65532)));
        assert_eq!(psc.seccomp_profile.unwrap().type_, "RuntimeDefault");
        let c = &pod.containers[0];
        let sc = c.security_context.clone().unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.capabilities.unwrap().drop.unwrap(), ["ALL"]);
        let r = c.resources.clone().unwrap();
        assert_eq!(r.requests, r.limits);
        assert_eq!(r.limits.unwrap()["cpu"].0, "250m");
        let vols = pod.volumes.unwrap();
        assert!(vols.iter().all(|v| v.host_path.is_none()));
        assert_eq!(vols[0].empty_dir.as_ref().unwrap().size_limit.as_ref().unwrap().0, (512u64 << 20).to_string());
        // Tenant labels never become annotations unless the operator allows their prefix.
        assert!(objs.pod.metadata.annotations.is_none());
        let owner = objs.pod.metadata.owner_references.unwrap();
        assert_eq!((owner[0].kind.as_str(), owner[0].controller), ("AgentTask", Some(true)));
    }

    #[test]
    fn isolation_sets_runtime_class_and_allowed_labels_become_annotations() {
        let mut t = task();
        t.spec.isolation = Some("gvisor".into());
        let settings =
            PodSettings { annotation_prefixes: vec!["kubesim.agenttask.io/".into()], ..PodSettings::default() };
        let objs = build(&t, &settings, &TaskDefaults::default()).unwrap();
        assert_eq!(objs.pod.spec.unwrap().runtime_class_name.as_deref(), Some("gvisor"));
        let ann = objs.pod.metadata.annotations.unwrap();
        assert_eq!(ann.len(), 1);
        assert_eq!(ann["kubesim.agenttask.io/outcome"], "OOMKilled");
    }

    #[test]
    fn an_artifacts_claim_is_mounted_with_the_tasks_sub_path_and_nothing_else_changes() {
        let mut t = task();
        let id = uuid::Uuid::new_v4();
        t.spec.admission = Some(crate::kube::crd::Admission { task_id: id.to_string(), attempt: 2 });
        let without = build(&t, &PodSettings::default(), &TaskDefaults::default()).unwrap().pod.spec.unwrap();
        assert!(without.volumes.as_ref().unwrap().iter().all(|v| v.persistent_volume_claim.is_none()));
        let settings = PodSettings { artifacts_claim: Some("task-artifacts".into()), ..PodSettings::default() };
        let with = build(&t, &settings, &TaskDefaults::default()).unwrap().pod.spec.unwrap();
        let vol = with.volumes.as_ref().unwrap().iter().find(|v| v.name == ARTIFACTS_VOLUME).unwrap();
        let pvc = vol.persistent_volume_claim.as_ref().unwrap();
        assert_eq!((pvc.claim_name.as_str(), pvc.read_only), ("task-artifacts", None));
        let c = &with.containers[0];
        let m = c.volume_mounts.as_ref().unwrap().iter().find(|m| m.name == ARTIFACTS_VOLUME).unwrap();
        assert_eq!(m.mount_path, ARTIFACTS_DIR);
        assert_eq!(m.sub_path.as_deref(), Some(format!("runs/acme/{id}").as_str()));
        let env = c.env.as_ref().unwrap();
        assert_eq!(
            env.iter().find(|e| e.name == "AGENTTASK_ARTIFACTS_DIR").unwrap().value.as_deref(),
            Some(ARTIFACTS_DIR)
        );
        // Still restricted: the same security contexts, one more volume and mount, no hostPath.
        assert_eq!(with.security_context, without.security_context);
        assert_eq!(c.security_context, without.containers[0].security_context);
        assert_eq!(with.volumes.as_ref().unwrap().len(), without.volumes.as_ref().unwrap().len() + 1);
        assert!(with.volumes.unwrap().iter().all(|v| v.host_path.is_none()));
        // An AgentTask not admitted yet has no run, so no sub-path.
        t.spec.admission = None;
        let pending = build(&t, &settings, &TaskDefaults::default()).unwrap().pod.spec.unwrap();
        assert!(pending.volumes.unwrap().iter().all(|v| v.persistent_volume_claim.is_none()));
    }

    #[test]
    fn network_policy_denies_everything() {
        let np = build(&task(), &PodSettings::default(), &TaskDefaults::default()).unwrap().network_policy;
        let spec = np.spec.unwrap();
        assert_eq!(spec.policy_types.unwrap(), ["Ingress", "Egress"]);
        assert!(spec.ingress.is_none() && spec.egress.is_none());
        assert_eq!(spec.pod_selector.unwrap().match_labels.unwrap()[LABEL_AGENTTASK], "at-1");
    }

    #[test]
    fn big_inputs_are_split_and_reassembled_in_order() {
        let big: Vec<u8> = (0..2_500_000u32).map(|i| (i % 251) as u8).collect();
        let inputs = vec![
            Input { target: "work/main.py".into(), bytes: b"x".to_vec() },
            Input { target: "work/big.bin".into(), bytes: big.clone() },
            Input { target: "work/empty".into(), bytes: Vec::new() },
        ];
        let packed = pack(&inputs, CONFIGMAP_CHUNK_BYTES);
        assert!(packed.len() >= 4);
        let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for (manifest, parts) in &packed {
            assert!(parts.values().map(Vec::len).sum::<usize>() <= CONFIGMAP_CHUNK_BYTES);
            for line in manifest.lines() {
                let (target, key) = line.split_once('\t').unwrap();
                files.entry(target.into()).or_default().extend_from_slice(&parts[key]);
            }
        }
        assert_eq!(files["work/big.bin"], big);
        assert_eq!(files["work/main.py"], b"x");
        assert!(files["work/empty"].is_empty());
    }

    #[test]
    fn log_sections_are_taken_apart() {
        let log = format!("hello{STDERR_MARK}oops{RESULT_MARK}{{\"big\":1}}");
        let p = parse_log(log.as_bytes(), None, 100, 100);
        assert_eq!((p.stdout.as_slice(), p.stderr.as_slice()), (&b"hello"[..], &b"oops"[..]));
        assert_eq!(p.result.as_deref(), Some(&b"{\"big\":1}"[..]));
        let p = parse_log(format!("0123456789{STDERR_MARK}").as_bytes(), Some("{\"a\":2}"), 4, 100);
        assert!(p.stdout_truncated && p.stdout == b"0123");
        assert_eq!(p.result.as_deref(), Some(&b"{\"a\":2}"[..]));
        // A program printing a fake stderr mark only moves its own stdout around.
        let p = parse_log(format!("a{STDERR_MARK}b{STDERR_MARK}c").as_bytes(), None, 100, 100);
        assert_eq!(p.stderr, b"c");
        let p = parse_log(b"plain", None, 100, 100);
        assert_eq!(p.stdout, b"plain");
    }
}
