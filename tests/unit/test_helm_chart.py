"""helm/pdserve rendered offline by the Helm engine (helm-python-sdk, no helm binary, no cluster).

Every rendered manifest is checked against the Kubernetes schemas (kubernetes-validate)
or, for the RayCluster, against KubeRay's own CRD schema (tests/unit/data/kuberay).
"""

from __future__ import annotations

import copy
import gzip
import hashlib
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from pdserve.shared.config import ServeConfig

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "pdserve"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
CRD = Path(__file__).parent / "data" / "kuberay" / "ray.io_rayclusters.yaml.gz"
CRD_GIT_BLOB = "ff0be58ada3bd457605eff1f258c16df21e61e21"  # kuberay v1.7.0, see data/kuberay/SOURCE.md
CRD_SHA256 = "c44704442eef0c6721ad40c1d66782c8bd3fdab9d3344306a5820910a679baa1"
KUBE_VERSIONS = ("1.26.0", "1.33.0")  # the chart's kubeVersion floor, and a recent release
RELEASE, NAMESPACE = "llm", "serving"
CASES = {"default": None, **{path.stem: path for path in EXAMPLES}}


def _values(case: str) -> dict:
    path = CASES[case]
    return yaml.safe_load(path.read_text()) if path else {}


@pytest.fixture(scope="module")
def chart() -> helm.Chart:
    return helm.Chart.load(CHART)


def render(chart: helm.Chart, values: dict | None) -> list[dict]:
    """The release's manifests (NOTES.txt and empty templates left out)."""
    out = chart.render(values or None, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


@pytest.fixture(scope="module")
def rendered(chart) -> dict[str, list[dict]]:
    return {case: render(chart, _values(case)) for case in CASES}


@pytest.fixture(scope="module")
def raycluster_schema() -> dict:
    raw = gzip.decompress(CRD.read_bytes())
    assert hashlib.sha256(raw).hexdigest() == CRD_SHA256
    assert hashlib.sha1(b"blob %d\0" % len(raw) + raw).hexdigest() == CRD_GIT_BLOB
    crd = yaml.load(raw, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["metadata"]["name"] == "rayclusters.ray.io"
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


def pruned_fields(obj, schema: dict, path: str = "") -> list[str]:
    """Fields the API server would silently drop: not declared where the schema lists properties."""
    if isinstance(obj, list) and "items" in schema:
        return [p for i, item in enumerate(obj) for p in pruned_fields(item, schema["items"], f"{path}[{i}]")]
    if not isinstance(obj, dict) or schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    props = schema.get("properties")
    if props is None:
        extra = schema.get("additionalProperties")
        return [p for k, v in obj.items() for p in pruned_fields(v, extra, f"{path}.{k}")] \
            if isinstance(extra, dict) else []
    out = []
    for key, value in obj.items():
        if key not in props:
            out.append(f"{path}.{key}")
        else:
            out.extend(pruned_fields(value, props[key], f"{path}.{key}"))
    return out


def test_crd_copy_is_kuberays(raycluster_schema):
    spec = raycluster_schema["properties"]["spec"]["properties"]
    assert {"headGroupSpec", "workerGroupSpecs", "rayVersion"} <= set(spec)


@pytest.mark.parametrize("case", CASES)
def test_lint_is_clean(case):
    report = helm.lint(CHART, _values(case) or None, strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("case", CASES)
def test_manifests_validate(case, rendered, raycluster_schema):
    docs = rendered[case]
    kinds = sorted(d["kind"] for d in docs)
    assert {"RayCluster", "Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "NetworkPolicy"} <= set(kinds)
    assert ("ServiceMonitor" in kinds) == bool(_values(case).get("serviceMonitor", {}).get("enabled"))
    for doc in docs:
        if doc["kind"] == "RayCluster":
            jsonschema.Draft4Validator(raycluster_schema).validate(doc)
            assert pruned_fields(doc, raycluster_schema) == [], "fields KubeRay's schema does not know"
        elif doc["kind"] == "ServiceMonitor":
            # No Prometheus Operator CRD is pinned here: checked for what makes it scrape the gateway.
            assert doc["apiVersion"] == "monitoring.coreos.com/v1"
            assert doc["spec"]["endpoints"][0]["path"] == "/metrics"
            assert_service_monitor_scrapes_the_gateway(doc, docs)
        else:
            for version in KUBE_VERSIONS:
                kubernetes_validate.validate(doc, version, strict=True)


def assert_service_monitor_scrapes_the_gateway(monitor: dict, docs: list[dict]) -> None:
    """Its selector picks exactly the gateway's Service, in the release's namespace, by a port that Service has,
    and that port leads to the gateway container's port (where /metrics is served)."""
    spec = monitor["spec"]
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    wanted = spec["selector"]["matchLabels"]
    picked = [s for s in by_kind(docs, "Service") if wanted.items() <= s["metadata"].get("labels", {}).items()]
    assert [s["metadata"]["name"] for s in picked] == [f"{RELEASE}-pdserve-gateway"]
    (endpoint,) = spec["endpoints"]
    ports = [p for p in picked[0]["spec"]["ports"] if p["name"] == endpoint["port"]]
    assert len(ports) == 1, f"the gateway Service has no port named {endpoint['port']!r}"
    port = ports[0]
    container_ports = {p["name"]: p["containerPort"] for p in _gateway(docs).get("ports", [])}
    assert port["targetPort"] in container_ports or port["targetPort"] in container_ports.values()


def test_a_field_kuberay_does_not_know_is_caught(rendered, raycluster_schema):
    (cluster,) = by_kind(copy.deepcopy(rendered["default"]), "RayCluster")
    cluster["spec"]["workerGroupSpecs"][0]["replica"] = 2
    assert pruned_fields(cluster, raycluster_schema) == [".spec.workerGroupSpecs[0].replica"]
    cluster["spec"]["workerGroupSpecs"][0].pop("replica")
    cluster["spec"]["workerGroupSpecs"][0]["replicas"] = "2"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft4Validator(raycluster_schema).validate(cluster)


@pytest.mark.parametrize("case", [c for c in CASES if c != "default"])
def test_worker_groups_carry_the_values(case, rendered):
    values = _values(case)
    (cluster,) = by_kind(rendered[case], "RayCluster")
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"prefill", "decode"}
    for role, group in groups.items():
        want = values[role]
        pod = group["template"]["spec"]
        (container,) = pod["containers"]
        gpus = want["instancesPerPod"] * want["gpusPerInstance"]
        assert group["replicas"] == want["replicas"]
        assert group["template"]["metadata"]["labels"]["pdserve.io/gpu-type"] == want["gpuType"]
        assert pod["nodeSelector"] == want["nodeSelector"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus
        assert container["resources"]["requests"]["cpu"] == want["resources"]["requests"]["cpu"]
        assert group["resources"] == {"CPU": str(int(want["instancesPerPod"] * want["cpusPerInstance"])),
                                      "GPU": str(gpus), **want["rayResources"]}
        if "tolerations" in want:
            assert pod["tolerations"] == want["tolerations"]
    prefill_type, decode_type = values["prefill"]["gpuType"], values["decode"]["gpuType"]
    assert (prefill_type == decode_type) == (case == "hh")


@pytest.mark.parametrize("case", CASES)
def test_written_config_is_one_pdserve_serve_accepts(case, rendered, tmp_path):
    values = _values(case)
    (cm,) = by_kind(rendered[case], "ConfigMap")
    path = tmp_path / "config.yaml"
    path.write_text(cm["data"]["config.yaml"])
    config = ServeConfig.load(path)
    prefill = {"replicas": 1, "instancesPerPod": 1, "gpusPerInstance": 1, "cpusPerInstance": 4,
               **values.get("prefill", {})}
    decode = {"replicas": 1, "instancesPerPod": 1, "gpusPerInstance": 1, "cpusPerInstance": 4,
              "rayResources": {"pdserve_decode": "1"}, **values.get("decode", {})}
    prefill.setdefault("rayResources", {"pdserve_prefill": "1"})
    for pool, want in ((config.pools.prefill, prefill), (config.pools.decode, decode)):
        assert pool.instances == want["replicas"] * want["instancesPerPod"]
        assert pool.gpus_per_instance == want["gpusPerInstance"]
        assert pool.cpus_per_instance == want["cpusPerInstance"]
        # Each instance asks for its share of what its pods advertise: it lands on its own pool's pods.
        assert pool.resources == {k: float(v) / want["instancesPerPod"] for k, v in want["rayResources"].items()}
        assert pool.engine.engine_args == want.get("engineArgs", {})
    assert config.ray.address == "auto" and config.gateway.host == "0.0.0.0"
    # The gateway's own drain gives up when the decode pod's preStop does, before the pod is killed.
    deadline = values.get("decode", {}).get("drain", {}).get("deadlineSeconds", 100)
    assert config.pools.drain_timeout_s == deadline
    assert config.gateway.api_key is None  # the key comes from a Secret, never the ConfigMap
    if values:
        assert config.engine.model == values["pdserve"]["engine"]["model"]
        assert config.kv_transfer.transport == values["pdserve"]["kv_transfer"]["transport"]


def test_broken_values_file_is_rejected_naming_the_field(chart):
    broken = yaml.safe_load((Path(__file__).parent / "data" / "helm" / "broken-values.yaml").read_text())
    with pytest.raises(helm.HelmValuesError) as info:
        render(chart, broken)
    assert "/decode/replicas" in str(info.value)
    with pytest.raises(helm.HelmValuesError, match="/prefill.*gpuTyp"):
        chart.validate_schema({"prefill": {"gpuTyp": "H100"}})
    with pytest.raises(helm.HelmValuesError, match="/pdserve/gateway/api_key"):
        chart.validate_schema({"pdserve": {"gateway": {"api_key": "in-a-configmap"}}})
    with pytest.raises(helm.HelmValuesError, match="/gateway/replicas"):
        chart.validate_schema({"gateway": {"replicas": 2}})


def test_each_pool_gets_its_own_gpus_and_engine_arguments(chart, tmp_path):
    docs = render(chart, {"prefill": {"gpusPerInstance": 2, "instancesPerPod": 2, "engineArgs": {"max_num_seqs": 8}},
                          "decode": {"gpusPerInstance": 1, "engineArgs": {"max_num_seqs": 512}}})
    (cm,) = by_kind(docs, "ConfigMap")
    path = tmp_path / "config.yaml"
    path.write_text(cm["data"]["config.yaml"])
    pools = ServeConfig.load(path).pools
    assert (pools.prefill.gpus_per_instance, pools.decode.gpus_per_instance) == (2, 1)
    assert pools.prefill.resources == {"pdserve_prefill": 0.5}
    assert pools.prefill.engine.engine_args == {"max_num_seqs": 8}
    assert pools.decode.engine.engine_args == {"max_num_seqs": 512}


def test_the_other_pdserve_sections_pass_through(chart, tmp_path):
    sections = {"migration": {"enabled": True, "interval_s": 2.0}, "resume": {"max_resumes": 1},
                "slo": {}, "prefix_routing": {"index": "sent"}}
    docs = render(chart, {"pdserve": {"engine": {}, **sections}})
    (cm,) = by_kind(docs, "ConfigMap")
    path = tmp_path / "config.yaml"
    path.write_text(cm["data"]["config.yaml"])
    config = ServeConfig.load(path)
    assert config.migration.enabled and config.migration.interval_s == 2.0
    assert config.resume.max_resumes == 1 and config.prefix_routing.index == "sent"
    with pytest.raises(helm.HelmValuesError, match="/pdserve.*migrate"):
        chart.validate_schema({"pdserve": {"engine": {}, "migrate": {"enabled": True}}})


def test_optional_ingress_routes_to_the_gateway_service(chart, rendered):
    assert all(by_kind(docs, "Ingress") == [] for docs in rendered.values())  # off unless asked for
    docs = render(chart, {"gateway": {"ingress": {"enabled": True, "className": "nginx", "host": "llm.example.org",
                                                  "tls": [{"secretName": "llm-tls", "hosts": ["llm.example.org"]}]}}})
    (ingress,) = by_kind(docs, "Ingress")
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(ingress, version, strict=True)
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "llm.example.org" and ingress["spec"]["ingressClassName"] == "nginx"
    backend = rule["http"]["paths"][0]["backend"]["service"]
    (service,) = [s for s in by_kind(docs, "Service") if s["metadata"]["name"] == backend["name"]]
    assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}


def _gateway(docs: list[dict]) -> dict:
    (deploy,) = by_kind(docs, "Deployment")
    return deploy["spec"]["template"]["spec"]["containers"][0]


def test_gateway_probes_api_key_and_ray_join(chart, rendered):
    gw = _gateway(rendered["default"])
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert gw[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert "PDSERVE_API_KEY" not in {e["name"] for e in gw["env"]}
    assert "--num-cpus=0 --num-gpus=0" in gw["args"][0] and "pdserve serve --config" in gw["args"][0]
    docs = render(chart, {"gateway": {"apiKey": {"value": "s3cret"}}})
    (secret,) = by_kind(docs, "Secret")
    env = {e["name"]: e for e in _gateway(docs)["env"]}
    ref = env["PDSERVE_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": secret["metadata"]["name"], "key": "api-key"}
    docs = render(chart, {"gateway": {"apiKey": {"existingSecret": "mine", "secretKey": "k"}}})
    assert by_kind(docs, "Secret") == []
    assert {e["name"]: e for e in _gateway(docs)["env"]}["PDSERVE_API_KEY"]["valueFrom"]["secretKeyRef"] == \
        {"name": "mine", "key": "k"}


DRAIN_SCRIPT = "/opt/pdserve/bin/drain_node.py"


def _workers(docs: list[dict]) -> dict[str, dict]:
    (cluster,) = by_kind(docs, "RayCluster")
    return {g["groupName"]: g["template"]["spec"] for g in cluster["spec"]["workerGroupSpecs"]}


@pytest.mark.parametrize("case", CASES)
def test_worker_prestop_drains_the_pod_through_the_gateway(case, rendered):
    docs = rendered[case]
    values = _values(case)
    (service,) = [s for s in by_kind(docs, "Service") if s["metadata"]["name"].endswith("-gateway")]
    gateway_key = {e["name"]: e for e in _gateway(docs)["env"]}.get("PDSERVE_API_KEY")
    for role, pod in _workers(docs).items():
        (container,) = pod["containers"]
        assert container["lifecycle"]["preStop"]["exec"]["command"] == ["python", DRAIN_SCRIPT]
        env = {e["name"]: e for e in container["env"]}
        # The pod's own IP is its Ray node address: what /admin/instances reports as node_ip.
        assert env["PDSERVE_NODE_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
        port = service["spec"]["ports"][0]["port"]
        assert env["PDSERVE_GATEWAY_URL"]["value"] == \
            f"http://{service['metadata']['name']}.{NAMESPACE}.svc:{port}"
        assert env.get("PDSERVE_API_KEY") == gateway_key  # the admin API takes the same key as /v1/
        assert int(env["PDSERVE_DRAIN_DEADLINE_S"]["value"]) < pod["terminationGracePeriodSeconds"]
        if values.get(role, {}).get("terminationGracePeriodSeconds"):
            assert pod["terminationGracePeriodSeconds"] == values[role]["terminationGracePeriodSeconds"]


def test_the_drain_script_is_where_the_images_put_it():
    for dockerfile in sorted((REPO / "docker").glob("Dockerfile.*[!e]")):
        workdir, dest = "/", None
        for line in dockerfile.read_text().splitlines():
            if line.startswith("WORKDIR "):
                workdir = line.split()[1]
            elif line.startswith("COPY deploy/drain_node.py "):
                dest = str(Path(workdir) / line.split()[2])
                break
        assert dest == DRAIN_SCRIPT, dockerfile.name
        ignore = (dockerfile.parent / f"{dockerfile.name}.dockerignore").read_text().splitlines()
        assert "!deploy/drain_node.py" in ignore  # in the build context


def test_prestop_can_be_replaced_or_turned_off(chart):
    own = ["/bin/sh", "-c", "my-drain --wait"]
    pods = _workers(render(chart, {"decode": {"preStop": {"command": own}}, "prefill": {"drain": {"enabled": False}}}))
    decode = pods["decode"]["containers"][0]
    assert decode["lifecycle"]["preStop"]["exec"]["command"] == own
    assert "PDSERVE_GATEWAY_URL" not in {e["name"] for e in decode["env"]}
    assert "lifecycle" not in pods["prefill"]["containers"][0]
    with pytest.raises(helm.HelmRenderError, match="decode.drain.deadlineSeconds.*terminationGracePeriodSeconds"):
        render(chart, {"decode": {"drain": {"deadlineSeconds": 120}, "terminationGracePeriodSeconds": 120}})
    with pytest.raises(helm.HelmValuesError, match="/decode/drain"):
        chart.validate_schema({"decode": {"drain": {"deadline": 10}}})


def test_autoscaling_follows_pdserve_scale(chart, rendered, raycluster_schema):
    (cluster,) = by_kind(rendered["default"], "RayCluster")
    assert "enableInTreeAutoscaling" not in cluster["spec"]
    (cluster,) = by_kind(rendered["ha"], "RayCluster")  # the HA example turns it on
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    assert cluster["spec"]["autoscalerOptions"] == {"idleTimeoutSeconds": 120, "upscalingMode": "Default"}
    decode = [g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == "decode"][0]
    assert (decode["minReplicas"], decode["replicas"], decode["maxReplicas"]) == (1, 3, 4)
    # The pool starts at the pods' instances; more wait for the pods the autoscaler adds.
    (cm,) = by_kind(rendered["ha"], "ConfigMap")
    assert yaml.safe_load(cm["data"]["config.yaml"])["pools"]["decode"]["instances"] == 24
    with pytest.raises(helm.HelmRenderError, match="decode: replicas \\(5\\) must lie within"):
        render(chart, {"autoscaling": {"enabled": True}, "decode": {"replicas": 5, "maxReplicas": 4}})
    with pytest.raises(helm.HelmRenderError, match="prefill: minReplicas \\(3\\) is above maxReplicas"):
        render(chart, {"prefill": {"minReplicas": 3}})
    with pytest.raises(helm.HelmValuesError, match="/autoscaling/upscalingMode"):
        chart.validate_schema({"autoscaling": {"upscalingMode": "Fast"}})


def test_pdbs_and_network_policies_select_the_release(rendered):
    docs = rendered["default"]
    (cluster,) = by_kind(docs, "RayCluster")
    name = cluster["metadata"]["name"]
    pdbs = {p["metadata"]["name"]: p["spec"] for p in by_kind(docs, "PodDisruptionBudget")}
    for role in ("prefill", "decode"):
        # KubeRay labels every worker pod with its cluster and group.
        assert pdbs[f"{RELEASE}-pdserve-{role}"]["selector"]["matchLabels"] == \
            {"ray.io/cluster": name, "ray.io/group": role}
    policies = {p["metadata"]["name"]: p["spec"] for p in by_kind(docs, "NetworkPolicy")}
    ray = policies[f"{RELEASE}-pdserve-ray"]
    assert ray["podSelector"]["matchLabels"] == {"ray.io/cluster": name}
    # Only this release's pods (which all carry these labels) reach Ray's and the KV transport's ports.
    (rule,) = ray["ingress"]
    assert rule == {"from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "pdserve",
                                                                "app.kubernetes.io/instance": RELEASE}}}]}
    pods = [g["template"]["metadata"]["labels"] for g in cluster["spec"]["workerGroupSpecs"]]
    pods.append(cluster["spec"]["headGroupSpec"]["template"]["metadata"]["labels"])
    pods.append(by_kind(docs, "Deployment")[0]["spec"]["template"]["metadata"]["labels"])
    for labels in pods:
        assert labels["app.kubernetes.io/instance"] == RELEASE
    gateway = policies[f"{RELEASE}-pdserve-gateway"]
    assert {"ports": [{"port": 8000, "protocol": "TCP"}]} in gateway["ingress"]
    # The worker pods' preStop drain reaches the gateway's admin API.
    assert {"from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "pdserve",
                                                      "app.kubernetes.io/instance": RELEASE}}}]} in gateway["ingress"]


def test_chart_pins_match_the_project(chart):
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'"ray[default]=={chart.values["ray"]["version"]}"' in pyproject
    assert chart.values["image"]["tag"].startswith(chart.metadata["appVersion"])
    assert 'version = "%s"' % chart.metadata["appVersion"] in pyproject
