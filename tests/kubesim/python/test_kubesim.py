"""The official Kubernetes Python client against agenttask-kubesim.

Run by the Rust integration test `tests/python.rs`, which starts the emulator and sets
KUBESIM_URL. By hand:  KUBESIM_URL=http://127.0.0.1:PORT python3 -m unittest -v test_kubesim
"""

import json
import os
import threading
import time
import unittest
import urllib.error
import urllib.request
import uuid

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException
import kubernetes_validate

URL = os.environ["KUBESIM_URL"]
cfg = client.Configuration(host=URL)
client.Configuration.set_default(cfg)
api_client = client.ApiClient(cfg)
core = client.CoreV1Api(api_client)
custom = client.CustomObjectsApi(api_client)
ext = client.ApiextensionsV1Api(api_client)
net = client.NetworkingV1Api(api_client)
coord = client.CoordinationV1Api(api_client)
node_api = client.NodeV1Api(api_client)

GROUP, VERSION, PLURAL = "example.kubesim.io", "v1", "widgets"
APPLY = "application/apply-patch+yaml"
MERGE = "application/merge-patch+json"


def status_of(e):
    """The Status object of an ApiException."""
    return json.loads(e.body)


def post(path):
    req = urllib.request.Request(URL + path, method="POST", data=b"")
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read())


def raw(method, path, body=None, content_type="application/json"):
    """A request without the typed client: (status, headers, decoded JSON body)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(URL + path, method=method, data=data, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


def eventually(f, timeout=10.0, what="condition"):
    end = time.time() + timeout
    while True:
        v = f()
        if v:
            return v
        if time.time() > end:
            raise AssertionError(f"{what} not met within {timeout}s")
        time.sleep(0.05)


def gone(f):
    try:
        f()
        return False
    except ApiException as e:
        return e.status == 404


def crd():
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"plural": PLURAL, "singular": "widget", "kind": "Widget", "shortNames": ["wd"]},
            "versions": [{
                "name": VERSION, "served": True, "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [{"name": "Size", "type": "integer", "jsonPath": ".spec.size"}],
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                    "spec": {"type": "object", "required": ["size"], "properties": {
                        "size": {"type": "integer", "minimum": 1},
                        "color": {"type": "string", "enum": ["red", "green"], "default": "red"},
                        "items": {"type": "array", "x-kubernetes-list-type": "map",
                                  "x-kubernetes-list-map-keys": ["name"],
                                  "items": {"type": "object", "required": ["name"], "properties": {
                                      "name": {"type": "string"}, "value": {"type": "string"}}}},
                    }},
                    "status": {"type": "object", "properties": {"phase": {"type": "string"}}},
                }}},
            }],
        },
    }


def widget(name, size=1, **spec):
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Widget", "metadata": {"name": name},
            "spec": {"size": size, **spec}}


class Base(unittest.TestCase):
    def setUp(self):
        self.ns = "t-" + uuid.uuid4().hex[:8]
        core.create_namespace({"metadata": {"name": self.ns}})

    def cm(self, name, data=None, **meta):
        return core.create_namespaced_config_map(
            self.ns, {"metadata": {"name": name, **meta}, "data": data or {"k": "v"}})


class Discovery(unittest.TestCase):
    def test_version_groups_and_resources(self):
        v = client.VersionApi(api_client).get_code()
        self.assertEqual((v.major, v.minor), ("1", "32"))
        self.assertEqual(client.CoreApi(api_client).get_api_versions().versions, ["v1"])
        groups = {g.name: g.preferred_version.version for g in client.ApisApi(api_client).get_api_versions().groups}
        for g in ("networking.k8s.io", "coordination.k8s.io", "node.k8s.io", "apiextensions.k8s.io", "events.k8s.io"):
            self.assertEqual(groups[g], "v1")
        core_res = {r.name: r for r in core.get_api_resources().resources}
        self.assertEqual(core_res["pods"].kind, "Pod")
        self.assertTrue(core_res["pods"].namespaced)
        self.assertIn("watch", core_res["pods"].verbs)
        self.assertIn("pods/log", core_res)
        self.assertIn("pods/status", core_res)
        self.assertFalse(core_res["namespaces"].namespaced)

    def test_crd_kind_served_with_short_names_and_printer_columns(self):
        ensure_crd()
        code, _, doc = raw("GET", f"/apis/{GROUP}/{VERSION}")
        self.assertEqual(code, 200)
        widgets = [r for r in doc["resources"] if r["name"] == PLURAL][0]
        self.assertEqual((widgets["kind"], widgets["shortNames"], widgets["namespaced"]), ("Widget", ["wd"], True))
        ns = "disc-" + uuid.uuid4().hex[:6]
        core.create_namespace({"metadata": {"name": ns}})
        custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, widget("t", size=4))
        req = urllib.request.Request(f"{URL}/apis/{GROUP}/{VERSION}/namespaces/{ns}/{PLURAL}",
                                     headers={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"})
        with urllib.request.urlopen(req) as r:
            table = json.loads(r.read())
            self.assertTrue(r.headers["Content-Type"].startswith("application/json;as=Table"))
        self.assertEqual(table["kind"], "Table")
        self.assertEqual([c["name"] for c in table["columnDefinitions"]], ["Name", "Size"])
        self.assertEqual(table["rows"][0]["cells"], ["t", 4])
        self.assertEqual(table["rows"][0]["object"]["kind"], "PartialObjectMetadata")


class Metadata(Base):
    def test_uid_timestamps_and_global_resource_version(self):
        a = self.cm("a")
        b = self.cm("b")
        self.assertEqual(len(a.metadata.uid), 36)
        self.assertNotEqual(a.metadata.uid, b.metadata.uid)
        self.assertIsNotNone(a.metadata.creation_timestamp)
        self.assertLess(int(a.metadata.resource_version), int(b.metadata.resource_version))
        # A write to another kind still moves the one global counter forward.
        s = core.create_namespaced_secret(self.ns, {"metadata": {"name": "s"}, "stringData": {"x": "y"}})
        self.assertLess(int(b.metadata.resource_version), int(s.metadata.resource_version))
        self.assertEqual(s.data, {"x": "eQ=="})
        self.assertEqual(s.type, "Opaque")
        # A no-op update changes nothing.
        same = core.replace_namespaced_config_map("a", self.ns, a)
        self.assertEqual(same.metadata.resource_version, a.metadata.resource_version)

    def test_generation_bumps_on_spec_only(self):
        ensure_crd()
        w = custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, widget("w"))
        self.assertEqual(w["metadata"]["generation"], 1)
        self.assertEqual(w["spec"]["color"], "red")  # schema default
        w = custom.patch_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, "w",
                                                  {"metadata": {"labels": {"a": "b"}}}, _content_type=MERGE)
        self.assertEqual(w["metadata"]["generation"], 1)
        w = custom.patch_namespaced_custom_object_status(GROUP, VERSION, self.ns, PLURAL, "w",
                                                         {"status": {"phase": "Up"}}, _content_type=MERGE)
        self.assertEqual(w["metadata"]["generation"], 1)
        w = custom.patch_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, "w",
                                                  {"spec": {"size": 2}}, _content_type=MERGE)
        self.assertEqual(w["metadata"]["generation"], 2)

    def test_default_service_account_and_root_ca(self):
        sa = eventually(lambda: core.list_namespaced_service_account(self.ns).items)
        self.assertEqual([s.metadata.name for s in sa], ["default"])
        self.assertIn("ca.crt", core.read_namespaced_config_map("kube-root-ca.crt", self.ns).data)


class Errors(Base):
    def test_not_found(self):
        with self.assertRaises(ApiException) as cm:
            core.read_namespaced_config_map("nope", self.ns)
        s = status_of(cm.exception)
        self.assertEqual(cm.exception.status, 404)
        self.assertEqual(s, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                             "message": 'configmaps "nope" not found', "reason": "NotFound",
                             "details": {"name": "nope", "group": "", "kind": "configmaps"}, "code": 404})

    def test_already_exists(self):
        self.cm("a")
        with self.assertRaises(ApiException) as cm:
            self.cm("a")
        self.assertEqual(cm.exception.status, 409)
        self.assertEqual(status_of(cm.exception)["reason"], "AlreadyExists")
        self.assertEqual(status_of(cm.exception)["message"], 'configmaps "a" already exists')

    def test_conflict_on_stale_resource_version(self):
        a = self.cm("a")
        a.data = {"k": "2"}
        core.replace_namespaced_config_map("a", self.ns, a)
        a.data = {"k": "3"}
        with self.assertRaises(ApiException) as cm:
            core.replace_namespaced_config_map("a", self.ns, a)  # a still has the old resourceVersion
        s = status_of(cm.exception)
        self.assertEqual((cm.exception.status, s["reason"]), (409, "Conflict"))
        self.assertEqual(s["message"], 'Operation cannot be fulfilled on configmaps "a": the object has been '
                                       'modified; please apply your changes to the latest version and try again')

    def test_invalid_with_causes(self):
        with self.assertRaises(ApiException) as cm:
            core.create_namespaced_config_map(self.ns, {"metadata": {"name": "Not_Valid"}})
        s = status_of(cm.exception)
        self.assertEqual((cm.exception.status, s["reason"]), (422, "Invalid"))
        self.assertEqual(s["details"]["kind"], "ConfigMap")
        self.assertEqual(s["details"]["causes"][0]["field"], "metadata.name")
        ensure_crd()
        with self.assertRaises(ApiException) as cm:
            custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, widget("w", size=0, color="blue"))
        s = status_of(cm.exception)
        self.assertEqual(cm.exception.status, 422)
        self.assertEqual(sorted(c["field"] for c in s["details"]["causes"]), ["spec.color", "spec.size"])
        self.assertEqual(s["details"]["group"], GROUP)

    def test_unknown_fields_strict_warn_ignore(self):
        # The typed client refuses unknown fields itself, so these go raw.
        body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "s"}, "data": {"k": "v"}, "bogus": 1}
        path = f"/api/v1/namespaces/{self.ns}/configmaps"
        code, _, s = raw("POST", path + "?fieldValidation=Strict", body)
        self.assertEqual((code, s["reason"]), (400, "BadRequest"))
        self.assertEqual(s["message"], 'strict decoding error: unknown field "bogus"')
        code, headers, s = raw("POST", path + "?fieldValidation=Warn", body)
        self.assertEqual(code, 201)
        self.assertEqual(headers.get("Warning"), '299 - "unknown field \\"bogus\\""')
        self.assertNotIn("bogus", s)
        ensure_crd()
        with self.assertRaises(ApiException) as cm:
            custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, widget("w", extra=1),
                                                   field_validation="Strict")
        self.assertEqual(cm.exception.status, 400)
        w = custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, widget("w", extra=1),
                                                   field_validation="Ignore")
        self.assertNotIn("extra", w["spec"])  # pruned


class Reads(Base):
    def test_list_selectors_and_pages(self):
        for i in range(5):
            self.cm(f"c{i}", labels={"app": "x" if i % 2 == 0 else "y", "i": str(i)})
        raw = json.loads(core.list_namespaced_config_map(self.ns, label_selector="app=x",
                                                         _preload_content=False).data)
        self.assertEqual(raw["kind"], "ConfigMapList")
        self.assertEqual(raw["apiVersion"], "v1")
        self.assertTrue(int(raw["metadata"]["resourceVersion"]) > 0)
        self.assertEqual([i["metadata"]["name"] for i in raw["items"]], ["c0", "c2", "c4"])
        names = lambda l: [c.metadata.name for c in l.items]
        self.assertEqual(names(core.list_namespaced_config_map(self.ns, label_selector="app in (y),i!=1")), ["c3"])
        self.assertEqual(names(core.list_namespaced_config_map(self.ns, field_selector="metadata.name=c1")), ["c1"])
        with self.assertRaises(ApiException) as cm:
            core.list_namespaced_config_map(self.ns, field_selector="data.k=v")
        self.assertEqual(cm.exception.status, 400)
        # kube-root-ca.crt is there too, as in a real namespace: 6 configmaps.
        page = core.list_namespaced_config_map(self.ns, limit=2)
        seen = names(page)
        self.assertEqual(page.metadata.remaining_item_count, 4)
        while page.metadata._continue:
            page = core.list_namespaced_config_map(self.ns, limit=2, _continue=page.metadata._continue)
            seen += names(page)
        self.assertEqual(seen, ["c0", "c1", "c2", "c3", "c4", "kube-root-ca.crt"])
        # Pods by field: status.phase is a supported pod field label.
        pods = core.list_pod_for_all_namespaces(field_selector="status.phase=Running")
        self.assertIsInstance(pods.items, list)


class Watches(Base):
    def test_events_in_order_from_a_resource_version(self):
        rv = core.list_namespaced_config_map(self.ns).metadata.resource_version
        self.cm("w")
        core.patch_namespaced_config_map("w", self.ns, {"data": {"k": "2"}})
        core.delete_namespaced_config_map("w", self.ns)
        w = watch.Watch()
        events = []
        for e in w.stream(core.list_namespaced_config_map, self.ns, resource_version=rv, timeout_seconds=5):
            if e["object"].metadata.name == "w":
                events.append((e["type"], e["object"].data, int(e["object"].metadata.resource_version)))
            if len(events) == 3:
                w.stop()
        self.assertEqual([(t, d) for t, d, _ in events],
                         [("ADDED", {"k": "v"}), ("MODIFIED", {"k": "2"}), ("DELETED", {"k": "2"})])
        rvs = [r for _, _, r in events]
        self.assertEqual(rvs, sorted(rvs))
        self.assertEqual(len(set(rvs)), 3)

    def test_live_events_and_bookmarks(self):
        got = []
        w = watch.Watch()

        def writer():
            time.sleep(0.3)
            self.cm("live")
            core.delete_namespaced_config_map("live", self.ns)

        threading.Thread(target=writer).start()
        for e in w.stream(core.list_namespaced_config_map, self.ns, allow_watch_bookmarks=True,
                          timeout_seconds=5, resource_version="0"):
            got.append(e["type"])
            if "DELETED" in got and "BOOKMARK" in got:
                w.stop()
        self.assertIn("ADDED", got)
        self.assertLess(got.index("ADDED", 1), got.index("DELETED"))
        self.assertIn("BOOKMARK", got)

    def test_too_old_resource_version_is_410(self):
        rv = core.list_namespaced_config_map(self.ns).metadata.resource_version
        self.cm("x")
        post("/kubesim/compact")
        w = watch.Watch()
        with self.assertRaises(ApiException) as cm:
            for _ in w.stream(core.list_namespaced_config_map, self.ns, resource_version=rv, timeout_seconds=2):
                pass
        self.assertEqual(cm.exception.status, 410)
        self.assertIn("too old resource version", cm.exception.reason)

    def test_selector_transitions(self):
        self.cm("sel", labels={"on": "yes"})
        rv = core.list_namespaced_config_map(self.ns).metadata.resource_version
        core.patch_namespaced_config_map("sel", self.ns, {"metadata": {"labels": {"on": "no"}}})
        core.patch_namespaced_config_map("sel", self.ns, {"metadata": {"labels": {"on": "yes"}}})
        w = watch.Watch()
        types = []
        for e in w.stream(core.list_namespaced_config_map, self.ns, label_selector="on=yes",
                          resource_version=rv, timeout_seconds=3):
            types.append(e["type"])
            if len(types) == 2:
                w.stop()
        # Leaving the selector is a DELETED, coming back an ADDED, as the watch cache reports.
        self.assertEqual(types, ["DELETED", "ADDED"])


class Writes(Base):
    def test_patches(self):
        self.cm("p", {"a": "1", "b": "2"})
        r = core.patch_namespaced_config_map("p", self.ns, {"data": {"a": None, "c": "3"}}, _content_type=MERGE)
        self.assertEqual(r.data, {"b": "2", "c": "3"})
        r = core.patch_namespaced_config_map("p", self.ns, [{"op": "replace", "path": "/data/b", "value": "9"},
                                                            {"op": "add", "path": "/metadata/labels", "value": {"x": "y"}}],
                                             _content_type="application/json-patch+json")
        self.assertEqual((r.data["b"], r.metadata.labels), ("9", {"x": "y"}))
        with self.assertRaises(ApiException) as cm:
            core.patch_namespaced_config_map("p", self.ns, [{"op": "test", "path": "/data/b", "value": "0"}],
                                             _content_type="application/json-patch+json")
        self.assertEqual(cm.exception.status, 422)

    def test_strategic_merge_patch_merges_containers_by_name(self):
        pod = {"metadata": {"name": "smp", "annotations": {"kubesim.agenttask.io/outcome": "DeadlineExceeded"}},
               "spec": {"restartPolicy": "Never", "containers": [
                   {"name": "a", "image": "python:3.11", "env": [{"name": "E", "value": "1"}]},
                   {"name": "b", "image": "r-base:4"}]}}
        core.create_namespaced_pod(self.ns, pod)
        r = core.patch_namespaced_pod("smp", self.ns, {"spec": {"containers": [{"name": "b", "image": "r-base:5"}]}},
                                      _content_type="application/strategic-merge-patch+json")
        self.assertEqual([(c.name, c.image) for c in r.spec.containers], [("a", "python:3.11"), ("b", "r-base:5")])
        self.assertEqual(r.spec.containers[0].env[0].name, "E")
        with self.assertRaises(ApiException) as cm:  # pod specs are immutable beyond images
            core.patch_namespaced_pod("smp", self.ns, {"spec": {"restartPolicy": "Always"}})
        self.assertEqual(cm.exception.status, 422)
        ensure_crd()
        custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, widget("w"))
        with self.assertRaises(ApiException) as cm:
            custom.patch_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, "w", {"spec": {"size": 3}},
                                                  _content_type="application/strategic-merge-patch+json")
        self.assertEqual(cm.exception.status, 415)

    def test_status_subresource(self):
        ensure_crd()
        w = custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL,
                                                   {**widget("s"), "status": {"phase": "Fake"}})
        self.assertNotIn("status", w)  # status is dropped on create
        w["status"] = {"phase": "Ignored"}
        w["spec"]["size"] = 5
        w = custom.replace_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, "s", w)
        self.assertEqual(w["spec"]["size"], 5)
        self.assertNotIn("status", w)  # the main resource ignores status
        w["status"] = {"phase": "Real"}
        w["spec"]["size"] = 7
        w = custom.replace_namespaced_custom_object_status(GROUP, VERSION, self.ns, PLURAL, "s", w)
        self.assertEqual((w["status"]["phase"], w["spec"]["size"]), ("Real", 5))  # /status ignores spec

    def test_finalizers_and_deletion_timestamp(self):
        self.cm("f", finalizers=["example.com/hold"])
        rv = core.read_namespaced_config_map("f", self.ns).metadata.resource_version
        core.delete_namespaced_config_map("f", self.ns)
        held = core.read_namespaced_config_map("f", self.ns)
        self.assertIsNotNone(held.metadata.deletion_timestamp)
        with self.assertRaises(ApiException) as cm:  # no new finalizers while deleting
            core.patch_namespaced_config_map("f", self.ns, {"metadata": {"finalizers": ["example.com/hold", "x/y"]}},
                                             _content_type=MERGE)
        self.assertEqual(cm.exception.status, 422)
        core.patch_namespaced_config_map("f", self.ns, {"metadata": {"finalizers": None}}, _content_type=MERGE)
        self.assertTrue(gone(lambda: core.read_namespaced_config_map("f", self.ns)))
        w = watch.Watch()
        types = []
        for e in w.stream(core.list_namespaced_config_map, self.ns, resource_version=rv, timeout_seconds=3):
            if e["object"].metadata.name == "f":
                types.append(e["type"])
            if len(types) == 2:
                w.stop()
        self.assertEqual(types, ["MODIFIED", "DELETED"])

    def owner_and_dependents(self):
        owner = self.cm("owner")
        ref = [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid,
                "blockOwnerDeletion": True}]
        for d in ("d1", "d2"):
            self.cm(d, ownerReferences=ref)
        return owner

    def test_gc_background(self):
        self.owner_and_dependents()
        core.delete_namespaced_config_map("owner", self.ns, propagation_policy="Background")
        self.assertTrue(gone(lambda: core.read_namespaced_config_map("owner", self.ns)))
        for d in ("d1", "d2"):
            eventually(lambda: gone(lambda: core.read_namespaced_config_map(d, self.ns)), what=f"{d} collected")

    def test_gc_foreground(self):
        self.owner_and_dependents()
        # A finalizer on one dependent keeps the owner (foreground: dependents go first).
        core.patch_namespaced_config_map("d1", self.ns, {"metadata": {"finalizers": ["example.com/hold"]}})
        r = core.delete_namespaced_config_map("owner", self.ns, propagation_policy="Foreground")
        owner = core.read_namespaced_config_map("owner", self.ns)
        self.assertIn("foregroundDeletion", owner.metadata.finalizers)
        eventually(lambda: gone(lambda: core.read_namespaced_config_map("d2", self.ns)), what="d2 collected")
        eventually(lambda: core.read_namespaced_config_map("d1", self.ns).metadata.deletion_timestamp)
        self.assertFalse(gone(lambda: core.read_namespaced_config_map("owner", self.ns)))
        core.patch_namespaced_config_map("d1", self.ns, {"metadata": {"finalizers": None}}, _content_type=MERGE)
        eventually(lambda: gone(lambda: core.read_namespaced_config_map("owner", self.ns)), what="owner removed")

    def test_gc_orphan(self):
        self.owner_and_dependents()
        core.delete_namespaced_config_map("owner", self.ns, propagation_policy="Orphan")
        eventually(lambda: gone(lambda: core.read_namespaced_config_map("owner", self.ns)), what="owner removed")
        for d in ("d1", "d2"):
            self.assertIsNone(core.read_namespaced_config_map(d, self.ns).metadata.owner_references)

    def test_namespace_deletion_empties_it(self):
        self.cm("x")
        core.delete_namespace(self.ns)
        self.assertEqual(core.read_namespace(self.ns).status.phase, "Terminating")
        with self.assertRaises(ApiException) as cm:
            self.cm("y")
        self.assertEqual(cm.exception.status, 403)
        eventually(lambda: gone(lambda: core.read_namespace(self.ns)), what="namespace removed")
        self.assertTrue(gone(lambda: core.read_namespaced_config_map("x", self.ns)))


class ServerSideApply(Base):
    def apply(self, manager, data, force=None):
        body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "ssa", "namespace": self.ns},
                "data": data}
        return core.patch_namespaced_config_map("ssa", self.ns, body, field_manager=manager, force=force,
                                                _content_type=APPLY)

    def test_apply_creates_updates_and_records_managers(self):
        r = self.apply("alice", {"a": "1", "b": "2"})
        self.assertEqual(r.data, {"a": "1", "b": "2"})
        mf = r.metadata.managed_fields
        self.assertEqual([(m.manager, m.operation, m.fields_type) for m in mf], [("alice", "Apply", "FieldsV1")])
        self.assertEqual(mf[0].fields_v1, {"f:data": {"f:a": {}, "f:b": {}}})
        with self.assertRaises(ApiException) as cm:
            self.apply("bob", {"a": "other"})
        s = status_of(cm.exception)
        self.assertEqual((cm.exception.status, s["reason"]), (409, "Conflict"))
        self.assertEqual(s["details"]["causes"][0]["field"], ".data.a")
        self.assertIn('conflict with "alice"', s["message"])
        r = self.apply("bob", {"a": "other"}, force=True)
        self.assertEqual(r.data, {"a": "other", "b": "2"})
        owners = {m.manager: m.fields_v1 for m in r.metadata.managed_fields}
        self.assertEqual(owners, {"alice": {"f:data": {"f:b": {}}}, "bob": {"f:data": {"f:a": {}}}})
        # alice stops applying b: it is removed; a stays (bob owns it).
        r = self.apply("alice", {"c": "3"})
        self.assertEqual(r.data, {"a": "other", "c": "3"})
        # A non-apply update takes ownership of what it changes.
        r = core.patch_namespaced_config_map("ssa", self.ns, {"data": {"c": "4"}}, field_manager="editor")
        self.assertIn("editor", [m.manager for m in r.metadata.managed_fields])
        self.assertEqual([m.operation for m in r.metadata.managed_fields if m.manager == "editor"], ["Update"])

    def test_apply_status_of_a_missing_object_is_404(self):
        ensure_crd()
        body = {**widget("absent"), "status": {"phase": "x"}}
        with self.assertRaises(ApiException) as cm:
            custom.patch_namespaced_custom_object_status(GROUP, VERSION, self.ns, PLURAL, "absent", body,
                                                         field_manager="m", _content_type=APPLY)
        self.assertEqual(cm.exception.status, 404)

    def test_apply_custom_object_with_map_list(self):
        ensure_crd()
        body = widget("m", items=[{"name": "x", "value": "1"}])
        custom.patch_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, "m", body, field_manager="one",
                                              _content_type=APPLY)
        body = widget("m", items=[{"name": "y", "value": "2"}])
        r = custom.patch_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, "m", body, field_manager="two",
                                                  _content_type=APPLY)
        # A map-type list merges by key across managers.
        self.assertEqual(r["spec"]["items"], [{"name": "x", "value": "1"}, {"name": "y", "value": "2"}])


class CoreKinds(Base):
    def test_round_trips(self):
        core.create_namespaced_service_account(self.ns, {"metadata": {"name": "runner"}})
        core.create_namespaced_event(self.ns, {"metadata": {"name": "e1"}, "involvedObject": {"kind": "Pod", "name": "p",
                                                                                            "namespace": self.ns},
                                               "reason": "Test", "message": "hello", "type": "Normal"})
        evs = core.list_namespaced_event(self.ns, field_selector="involvedObject.name=p,reason=Test")
        self.assertEqual([e.message for e in evs.items], ["hello"])
        net.create_namespaced_network_policy(self.ns, {"metadata": {"name": "deny"},
                                                       "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}})
        np = net.read_namespaced_network_policy("deny", self.ns)
        self.assertEqual(np.spec.policy_types, ["Ingress", "Egress"])
        self.assertEqual(np.metadata.generation, 1)
        lease = coord.create_namespaced_lease(self.ns, {"metadata": {"name": "leader"},
                                                        "spec": {"holderIdentity": "me", "leaseDurationSeconds": 15}})
        lease.spec.holder_identity = "you"
        self.assertEqual(coord.replace_namespaced_lease("leader", self.ns, lease).spec.holder_identity, "you")
        name = "rc-" + self.ns
        node_api.create_runtime_class({"metadata": {"name": name}, "handler": "runsc"})
        self.assertEqual(node_api.read_runtime_class(name).handler, "runsc")
        node_api.delete_runtime_class(name)
        self.assertTrue(gone(lambda: node_api.read_runtime_class(name)))


class Admission(Base):
    def restricted_pod(self, name):
        return {"metadata": {"name": name}, "spec": {
            "restartPolicy": "Never", "automountServiceAccountToken": False,
            "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "main", "image": "python:3.12", "securityContext": {
                "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}]}}

    def test_runtime_class(self):
        pod = self.restricted_pod("rc")
        pod["spec"]["runtimeClassName"] = "gvisor-" + self.ns
        with self.assertRaises(ApiException) as cm:
            core.create_namespaced_pod(self.ns, pod)
        s = status_of(cm.exception)
        self.assertEqual((cm.exception.status, s["reason"]), (403, "Forbidden"))
        self.assertEqual(s["message"], f'pods "rc" is forbidden: pod rejected: RuntimeClass "gvisor-{self.ns}" not found')
        node_api.create_runtime_class({"metadata": {"name": "gvisor-" + self.ns}, "handler": "runsc",
                                       "overhead": {"podFixed": {"memory": "64Mi"}}})
        created = core.create_namespaced_pod(self.ns, pod)
        self.assertEqual(created.spec.overhead, {"memory": "64Mi"})
        node_api.delete_runtime_class("gvisor-" + self.ns)

    def test_pod_security_enforce_and_warn(self):
        core.patch_namespace(self.ns, {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}})
        plain = {"metadata": {"name": "plain"}, "spec": {"containers": [{"name": "main", "image": "python:3.12"}]}}
        with self.assertRaises(ApiException) as cm:
            core.create_namespaced_pod(self.ns, plain)
        s = status_of(cm.exception)
        self.assertEqual(cm.exception.status, 403)
        self.assertTrue(s["message"].startswith('pods "plain" is forbidden: violates PodSecurity "restricted:latest": '
                                                'allowPrivilegeEscalation != false'), s["message"])
        core.create_namespaced_pod(self.ns, self.restricted_pod("ok"))
        core.patch_namespace(self.ns, {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": None,
                                                               "pod-security.kubernetes.io/warn": "baseline"}}})
        privileged = {"metadata": {"name": "priv"}, "spec": {"containers": [
            {"name": "main", "image": "python:3.12", "securityContext": {"privileged": True}}]}}
        code, headers, _ = raw("POST", f"/api/v1/namespaces/{self.ns}/pods", privileged)
        self.assertEqual(code, 201)
        self.assertIn('would violate PodSecurity \\"baseline:latest\\": privileged', headers.get("Warning"))


def run_pod(ns, name, annotations=None, **spec):
    body = {"metadata": {"name": name, "annotations": annotations or {}},
            "spec": {"restartPolicy": "Never", "containers": [{"name": "main", "image": "python:3.12"}], **spec}}
    return core.create_namespaced_pod(ns, body)


def wait_phase(ns, name, phases, timeout=10):
    def check():
        p = core.read_namespaced_pod(name, ns)
        return p if p.status.phase in phases else None
    return eventually(check, timeout, what=f"pod {name} in {phases}")


class Kubelet(Base):
    def test_success_logs_and_schema(self):
        run_pod(self.ns, "ok", {"kubesim.agenttask.io/stdout": "a\nb\nc\n",
                                "kubesim.agenttask.io/termination-message": "done"})
        w = watch.Watch()
        phases = []
        for e in w.stream(core.list_namespaced_pod, self.ns, field_selector="metadata.name=ok", timeout_seconds=10):
            phase = e["object"].status.phase
            if not phases or phases[-1] != phase:
                phases.append(phase)
            if phase == "Succeeded":
                w.stop()
        self.assertEqual(phases, ["Pending", "Running", "Succeeded"])
        p = core.read_namespaced_pod("ok", self.ns)
        t = p.status.container_statuses[0].state.terminated
        self.assertEqual((t.exit_code, t.reason, t.message), (0, "Completed", "done"))
        self.assertEqual(p.spec.node_name, "kubesim-node")
        # The objects the kubelet writes are valid Kubernetes 1.32 objects.
        raw = json.loads(core.read_namespaced_pod("ok", self.ns, _preload_content=False).data)
        kubernetes_validate.validate(raw, "1.32.0", strict=True)
        self.assertEqual(core.read_namespaced_pod_log("ok", self.ns), "a\nb\nc\n")
        self.assertEqual(core.read_namespaced_pod_log("ok", self.ns, tail_lines=2), "b\nc\n")
        self.assertEqual(core.read_namespaced_pod_log("ok", self.ns, limit_bytes=3), "a\nb")

    def test_follow_streams_until_the_container_ends(self):
        run_pod(self.ns, "f", {"kubesim.agenttask.io/stdout": "x\ny\n", "kubesim.agenttask.io/start-delay-ms": "300",
                               "kubesim.agenttask.io/run-ms": "500"})
        wait_phase(self.ns, "f", ["Running"])
        resp = core.read_namespaced_pod_log("f", self.ns, follow=True, _preload_content=False)
        body = resp.data.decode()  # returns when the log ends (the container exits)
        self.assertEqual(body, "x\ny\n")
        self.assertEqual(core.read_namespaced_pod("f", self.ns).status.phase, "Succeeded")

    def test_failures(self):
        run_pod(self.ns, "exit", {"kubesim.agenttask.io/exit-code": "7"})
        run_pod(self.ns, "oom", {"kubesim.agenttask.io/outcome": "OOMKilled"})
        run_pod(self.ns, "slow", {"kubesim.agenttask.io/outcome": "DeadlineExceeded"}, activeDeadlineSeconds=1)
        run_pod(self.ns, "pull", {"kubesim.agenttask.io/outcome": "ErrImagePull"})
        t = wait_phase(self.ns, "exit", ["Failed"]).status.container_statuses[0].state.terminated
        self.assertEqual((t.exit_code, t.reason), (7, "Error"))
        t = wait_phase(self.ns, "oom", ["Failed"]).status.container_statuses[0].state.terminated
        self.assertEqual((t.exit_code, t.reason), (137, "OOMKilled"))
        p = wait_phase(self.ns, "slow", ["Failed"])
        self.assertEqual(p.status.reason, "DeadlineExceeded")
        reasons = set()

        def pulled():
            p = core.read_namespaced_pod("pull", self.ns)
            s = p.status.container_statuses
            if s and s[0].state.waiting:
                reasons.add(s[0].state.waiting.reason)
            return {"ErrImagePull", "ImagePullBackOff"} <= reasons and p.status.phase == "Pending"
        eventually(pulled, what="image pull failures")
        with self.assertRaises(ApiException) as cm:
            core.read_namespaced_pod_log("pull", self.ns)
        self.assertEqual(cm.exception.status, 400)
        self.assertIn("is waiting to start", status_of(cm.exception)["message"])

    def test_vanishing_pod_and_graceful_delete(self):
        run_pod(self.ns, "gone", {"kubesim.agenttask.io/outcome": "vanish"})
        eventually(lambda: gone(lambda: core.read_namespaced_pod("gone", self.ns)), what="pod vanished")
        run_pod(self.ns, "long", {"kubesim.agenttask.io/outcome": "DeadlineExceeded"})
        wait_phase(self.ns, "long", ["Running"])
        deleting = core.delete_namespaced_pod("long", self.ns)
        self.assertIsNotNone(deleting.metadata.deletion_timestamp)
        self.assertEqual(deleting.metadata.deletion_grace_period_seconds, 30)
        eventually(lambda: gone(lambda: core.read_namespaced_pod("long", self.ns)), what="pod terminated")


_crd_ready = False


def ensure_crd():
    global _crd_ready
    if _crd_ready:
        return
    try:
        ext.create_custom_resource_definition(crd())
    except ApiException as e:
        if e.status != 409:
            raise
    eventually(lambda: any(c.type == "Established" and c.status == "True"
                           for c in (ext.read_custom_resource_definition(f"{PLURAL}.{GROUP}").status.conditions or [])))
    _crd_ready = True


if __name__ == "__main__":
    unittest.main(verbosity=2)
