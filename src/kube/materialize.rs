//! Pure: an admitted [`Job`] → the `AgentTask` that the backend applies. Code and files small
//! enough stay inline in the spec; larger ones go into ConfigMaps that the spec names in
//! `inputsFrom` (the backend creates them first, then hands their ownership to the AgentTask).

use std::collections::BTreeMap;

use base64::Engine as _;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::crd::{
    Admission, AgentTask, AgentTaskSpec, InputFile, TaskBackend, TaskLanguage, TaskResources, LABEL_AGENTTASK,
    LABEL_MANAGED_BY, LABEL_TASK_ID, LABEL_TENANT, MANAGER, MAX_INLINE_CODE_BYTES,
};
use super::podspec::{self, is_label_value, Input, CONFIGMAP_CHUNK_BYTES};
use crate::domain::task::Language;
use crate::exec::Job;

/// Files and stdin are kept inline while they add up to at most this (an object must stay well
/// under the API server's ~1.5 MiB request limit).
pub const MAX_INLINE_INPUT_BYTES: usize = 256 * 1024;

/// The AgentTask for `job` in `namespace`, and the ConfigMaps its `inputsFrom` names.
pub fn agent_task(job: &Job, namespace: &str, backend: TaskBackend, ttl_seconds: u32) -> (AgentTask, Vec<ConfigMap>) {
    let name = super::agent_task_name(job.key.task_id);
    let language = match job.language {
        Language::Python => TaskLanguage::Python,
        Language::R => TaskLanguage::R,
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    let inline_files: usize =
        job.files.values().map(|f| f.len() * 4 / 3 + 4).sum::<usize>() + job.stdin.as_ref().map_or(0, String::len);
    let code_inline = job.code.len() <= MAX_INLINE_CODE_BYTES;
    let files_inline = inline_files <= MAX_INLINE_INPUT_BYTES;
    let mut external: Vec<Input> = Vec::new();
    if !code_inline {
        external.push(Input {
            target: format!("work/{}", podspec::script_name(language)),
            bytes: job.code.clone().into_bytes(),
        });
    }
    let mut files = BTreeMap::new();
    for (n, bytes) in &job.files {
        if files_inline {
            let file = match std::str::from_utf8(bytes) {
                Ok(text) => InputFile { content: Some(text.to_owned()), content_base64: None },
                Err(_) => InputFile { content: None, content_base64: Some(b64.encode(bytes)) },
            };
            files.insert(n.clone(), file);
        } else {
            external.push(Input { target: format!("work/{n}"), bytes: bytes.clone() });
        }
    }
    let stdin = match (&job.stdin, files_inline) {
        (Some(s), false) => {
            external.push(Input { target: "stdin".into(), bytes: s.clone().into_bytes() });
            None
        }
        (s, _) => s.clone(),
    };
    let mut labels = BTreeMap::from([
        (LABEL_MANAGED_BY.to_owned(), MANAGER.to_owned()),
        (LABEL_TENANT.to_owned(), job.tenant.clone()),
        (LABEL_TASK_ID.to_owned(), job.key.task_id.to_string()),
    ]);
    if let Some(b) = job.batch_id.as_deref().filter(|b| is_label_value(b)) {
        labels.insert(podspec::LABEL_BATCH_KEY.to_owned(), b.to_owned());
    }
    let external_maps: Vec<ConfigMap> = if external.is_empty() {
        Vec::new()
    } else {
        podspec::pack(&external, CONFIGMAP_CHUNK_BYTES)
            .into_iter()
            .enumerate()
            .map(|(i, (manifest, parts))| {
                let meta = ObjectMeta {
                    name: Some(format!("{name}-big-{i:02}")),
                    namespace: Some(namespace.to_owned()),
                    labels: Some(BTreeMap::from([
                        (LABEL_MANAGED_BY.to_owned(), MANAGER.to_owned()),
                        (LABEL_AGENTTASK.to_owned(), name.clone()),
                    ])),
                    ..ObjectMeta::default()
                };
                podspec::input_config_map(meta, manifest, parts)
            })
            .collect()
    };
    let spec = AgentTaskSpec {
        tenant: Some(job.tenant.clone()),
        language,
        code: if code_inline { job.code.clone() } else { String::new() },
        files,
        inputs_from: external_maps.iter().filter_map(|c| c.metadata.name.clone()).collect(),
        stdin,
        args: job.args.clone(),
        env: job.env.clone(),
        resources: Some(TaskResources {
            cpu: Some(format!("{}m", job.cpu_millis)),
            memory: Some(job.memory_bytes.to_string()),
        }),
        timeout_seconds: Some(job.timeout.as_secs().clamp(1, 86_400) as u32),
        isolation: Some(job.isolation.clone()),
        backend: Some(backend),
        priority: Some(job.priority),
        batch_id: job.batch_id.clone(),
        labels: job.labels.clone(),
        ttl_seconds_after_finished: Some(ttl_seconds),
        admission: Some(Admission { task_id: job.key.task_id.to_string(), attempt: job.key.attempt }),
    };
    let mut task = AgentTask::new(&name, spec);
    task.metadata.namespace = Some(namespace.to_owned());
    task.metadata.labels = Some(labels);
    (task, external_maps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::RunKey;
    use std::time::Duration;

    pub(crate) fn job() -> Job {
        Job {
            key: RunKey { task_id: uuid::Uuid::nil(), attempt: 2 },
            tenant: "acme".into(),
            language: Language::Python,
            code: "print(1)".into(),
            files: BTreeMap::from([("a.bin".into(), vec![0xff, 0]), ("t.txt".into(), b"hi".to_vec())]),
            stdin: Some("x".into()),
            args: vec!["-v".into()],
            env: BTreeMap::from([("K".into(), "v".into())]),
            timeout: Duration::from_secs(9),
            cpu_millis: 250,
            memory_bytes: 128 << 20,
            isolation: "standard".into(),
            labels: BTreeMap::new(),
            batch_id: Some("b1".into()),
            priority: 3,
            artifact_quota_bytes: 1 << 30,
            kube_object: None,
        }
    }

    #[test]
    fn small_tasks_are_inline_and_round_trip_to_the_pod_inputs() {
        let (t, ext) = agent_task(&job(), "ns", TaskBackend::Podjob, 60);
        assert!(ext.is_empty());
        assert_eq!(t.metadata.name.as_deref(), Some("at-00000000-0000-0000-0000-000000000000"));
        assert_eq!(t.spec.admission.as_ref().unwrap().attempt, 2);
        assert_eq!(t.spec.files["a.bin"].content_base64.as_deref(), Some("/wA="));
        assert_eq!(t.spec.files["t.txt"].content.as_deref(), Some("hi"));
        let inputs = podspec::inline_inputs(&t).unwrap();
        let targets: Vec<_> = inputs.iter().map(|i| i.target.as_str()).collect();
        assert_eq!(targets, ["work/main.py", "work/a.bin", "work/t.txt", "stdin"]);
        assert_eq!(inputs[1].bytes, [0xff, 0]);
    }

    #[test]
    fn big_inputs_go_to_config_maps_named_in_the_spec() {
        let mut j = job();
        j.code = "#".repeat(MAX_INLINE_CODE_BYTES + 1);
        j.files.insert("big".into(), vec![7; 3 << 20]);
        let (t, ext) = agent_task(&j, "ns", TaskBackend::Podjob, 60);
        assert!(t.spec.code.is_empty() && t.spec.files.is_empty() && t.spec.stdin.is_none());
        assert_eq!(t.spec.inputs_from.len(), ext.len());
        assert!(ext.len() >= 4);
        let objs = podspec::build(
            &{
                let mut t = t;
                t.metadata.uid = Some("u".into());
                t
            },
            &Default::default(),
            &Default::default(),
        )
        .unwrap();
        assert_eq!(objs.config_maps.len(), 1, "only the empty manifest of the inline part");
        let mounted = objs.pod.spec.unwrap().volumes.unwrap().iter().filter(|v| v.config_map.is_some()).count();
        assert_eq!(mounted, 1 + ext.len());
    }
}
