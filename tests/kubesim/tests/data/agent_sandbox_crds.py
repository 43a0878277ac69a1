# Writes agent-sandbox-crds.yaml (our own stand-in schemas for agent-sandbox's CRDs):
#   python3 tests/kubesim/tests/data/agent_sandbox_crds.py > tests/kubesim/tests/data/agent-sandbox-crds.yaml
import yaml, sys

def obj(props=None, required=None, **extra):
    o = {"type": "object"}
    if props is not None:
        o["properties"] = props
    if required:
        o["required"] = required
    o.update(extra)
    return o

s = {"type": "string"}
dt = {"type": "string", "format": "date-time"}
free = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
strmap = {"type": "object", "additionalProperties": {"type": "string"}}
conditions = {
    "type": "array",
    "x-kubernetes-list-type": "map",
    "x-kubernetes-list-map-keys": ["type"],
    "items": obj({
        "type": {"type": "string", "maxLength": 316},
        "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
        "observedGeneration": {"type": "integer", "format": "int64", "minimum": 0},
        "lastTransitionTime": dt,
        "reason": {"type": "string", "minLength": 1, "maxLength": 1024,
                   "pattern": "^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"},
        "message": {"type": "string", "maxLength": 32768},
    }, ["lastTransitionTime", "message", "reason", "status", "type"]),
}
pod_template = obj({"metadata": obj({"labels": strmap, "annotations": strmap}),
                    "spec": free}, ["spec"])
blueprint = {
    "podTemplate": pod_template,
    "volumeClaimTemplates": {"type": "array", "x-kubernetes-list-type": "atomic", "items": free},
    "service": {"type": "boolean"},
}
sandbox_lifecycle = {
    "shutdownTime": dt,
    "shutdownPolicy": {"type": "string", "enum": ["Delete", "Retain"], "default": "Retain"},
}

def crd(group, plural, singular, kind, short, versions, status=True, scale=None, columns=None):
    vs = []
    for name, spec_schema, status_schema in versions:
        props = {"apiVersion": s, "kind": s, "metadata": {"type": "object"}, "spec": spec_schema}
        if status_schema is not None:
            props["status"] = status_schema
        v = {"name": name, "served": True, "storage": name == "v1beta1",
             "schema": {"openAPIV3Schema": obj(props, ["spec"])}}
        sub = {}
        if status:
            sub["status"] = {}
        if scale:
            sub["scale"] = scale
        if sub:
            v["subresources"] = sub
        if columns:
            v["additionalPrinterColumns"] = columns
        vs.append(v)
    return {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {"group": group, "scope": "Namespaced",
                 "names": {"plural": plural, "singular": singular, "kind": kind,
                           "listKind": kind + "List", "shortNames": [short]},
                 "conversion": {"strategy": "None"},
                 "versions": vs},
    }

sandbox_spec = obj({**blueprint, **sandbox_lifecycle,
                    "operatingMode": {"type": "string", "enum": ["Running", "Suspended"], "default": "Running"}},
                   ["podTemplate"])
sandbox_status = obj({"conditions": conditions, "selector": s, "podIPs": {"type": "array", "items": s},
                      "nodeName": s, "service": s, "serviceFQDN": s})
template_spec = obj({**blueprint,
                     "networkPolicy": obj({"ingress": {"type": "array", "items": free},
                                           "egress": {"type": "array", "items": free}}),
                     "networkPolicyManagement": {"type": "string", "enum": ["Managed", "Unmanaged"], "default": "Managed"},
                     "envVarsInjectionPolicy": {"type": "string", "enum": ["Allowed", "Overrides", "Disallowed"], "default": "Disallowed"},
                     "volumeClaimTemplatesPolicy": {"type": "string", "enum": ["Disallowed", "Allowed", "Overrides"], "default": "Disallowed"},
                     "generatedSecrets": {"type": "array", "items": free}},
                    ["podTemplate"])
claim_lifecycle = obj({"shutdownTime": dt,
                       "ttlSecondsAfterFinished": {"type": "integer", "format": "int32", "minimum": 0},
                       "shutdownPolicy": {"type": "string", "enum": ["Delete", "DeleteForeground", "Retain"], "default": "Retain"}})
ref = obj({"name": s}, ["name"])
claim_status = obj({"conditions": conditions,
                    "sandbox": obj({"name": s, "podIPs": {"type": "array", "items": s}})})
claim_beta = obj({"warmPoolRef": ref, "lifecycle": claim_lifecycle,
                  "additionalPodMetadata": obj({"labels": strmap, "annotations": strmap}),
                  "safeToEvict": {"type": "string", "enum": ["on-completion", "true", "false"]},
                  "env": {"type": "array", "x-kubernetes-list-type": "atomic",
                          "items": obj({"name": s, "value": s, "containerName": s}, ["name", "value"])}},
                 ["warmPoolRef"])
claim_alpha = obj({"sandboxTemplateRef": obj({"name": s}), "lifecycle": claim_lifecycle,
                   "warmpool": {"type": "string", "default": "default"}})
pool_spec = obj({"replicas": {"type": "integer", "format": "int32", "minimum": 0, "default": 1},
                 "sandboxTemplateRef": ref,
                 "updateStrategy": obj({"type": {"type": "string", "enum": ["Recreate", "OnReplenish"], "default": "OnReplenish"}})},
                ["sandboxTemplateRef"])
pool_status = obj({"replicas": {"type": "integer", "format": "int32"},
                   "readyReplicas": {"type": "integer", "format": "int32"}, "selector": s})
pool_columns = [{"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
                {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]
pool_scale = {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
              "labelSelectorPath": ".status.selector"}

docs = [
    crd("agents.x-k8s.io", "sandboxes", "sandbox", "Sandbox", "sandbox",
        [("v1beta1", sandbox_spec, sandbox_status), ("v1alpha1", sandbox_spec, sandbox_status)]),
    crd("extensions.agents.x-k8s.io", "sandboxtemplates", "sandboxtemplate", "SandboxTemplate", "sandboxtemplate",
        [("v1beta1", template_spec, None), ("v1alpha1", template_spec, None)], status=False),
    crd("extensions.agents.x-k8s.io", "sandboxclaims", "sandboxclaim", "SandboxClaim", "sandboxclaim",
        [("v1beta1", claim_beta, claim_status), ("v1alpha1", claim_alpha, claim_status)]),
    crd("extensions.agents.x-k8s.io", "sandboxwarmpools", "sandboxwarmpool", "SandboxWarmPool", "swp",
        [("v1beta1", pool_spec, pool_status), ("v1alpha1", pool_spec, pool_status)],
        scale=pool_scale, columns=pool_columns),
]
head = """# Stand-ins for kubernetes-sigs/agent-sandbox's CRDs (src/kube/agent-sandbox.md), written for the
# emulator: the same groups, kinds, versions (v1beta1 stored), short names, subresources and spec
# fields, with smaller schemas (the pod template is not checked field by field) and conversion
# None (the emulator has no webhooks). Generated by agent_sandbox_crds.py beside this file; edit
# that, not this file. A real cluster gets the project's own CRDs from its release manifest.
"""
sys.stdout.write(head + yaml.safe_dump_all(docs, sort_keys=False, explicit_start=True))
