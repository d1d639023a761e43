"""The cluster manifests under cluster/: Kubernetes schema, KubeRay fields and the operator rules (no Ray, no network).

* Every YAML file under cluster/ parses. Every Kubernetes object that ``kubectl apply -k cluster/kuberay`` creates
  (the kustomization's resources and generated ConfigMaps), plus the RayJob the CronJob creates from its
  ConfigMap, validates: built-in kinds against the Kubernetes OpenAPI schema (``kubernetes-validate``, strict,
  :data:`K8S_VERSION`); RayJob / RayService / RayCluster against an allow-list of the KubeRay v1 fields used
  here, with their head / worker / submitter pod templates validated as Kubernetes ``PodTemplate`` objects.
* The operator rules, one function each in :data:`RULES`, each returning the problems it finds (empty: the rule
  holds): dashboard not on loopback in KubeRay head groups, token auth on every Ray cluster and never turned off,
  nothing exposed (no LoadBalancer / NodePort / Ingress), every image pinned and from the allowed set, GPU
  requests consistent with Ray's GPUs and the RayService's GPU deployments, no inline secret, the RayJob
  entrypoint's config shipped in a ConfigMap and valid for ``pipelines.config.parse_config``, the CronJob's
  bounded history and its check for a still-running RayJob, every referenced ServiceAccount / ConfigMap / Role
  shipped, RBAC namespaced and narrow. Plus the AWS launcher config (token auth, loopback dashboard), the
  Dockerfile (base image of our Ray version, the image name the manifests use) and the kustomization.
* Each rule can fail: :data:`BREAKS` reintroduces each original problem of issue #32 (dashboard-host 127.0.0.1,
  no authOptions, ``bitnami/kubectl:1.31``, a RayService without ``num_gpus``, no history limits / no running
  check) and a few more into an in-memory copy of the manifests, and the rule must report it.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml

from pipelines.config import ConfigError, parse_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
AWS = CLUSTER / "aws" / "ray-cluster.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"
K8S_VERSION = "1.31"

RAY_VERSION = re.search(r"^ray==(\S+)$", (ROOT / ".ci" / "constraints.txt").read_text(), re.M).group(1)
PROJECT_VERSION = re.search(r'^version = "([^"]+)"$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
# The image cluster/Dockerfile documents building and pushing: every Ray pod must run it.
_BUILD = re.search(r"docker build -f cluster/Dockerfile -t (\S+) \.", DOCKERFILE.read_text())
PROJECT_IMAGE = _BUILD.group(1) if _BUILD else "<no `docker build -t` in cluster/Dockerfile>"
KUBECTL_IMAGE = re.compile(r"^registry\.k8s\.io/kubectl:v\d+\.\d+\.\d+$")  # distroless: kubectl only, no shell
RAY_IMAGE = re.compile(rf"^rayproject/ray:{re.escape(RAY_VERSION)}(-py3\d+)?(-cu\d+|-gpu|-cpu)?$")
SHELLS = {"sh", "bash", "ash", "dash", "zsh"}

RAY_KINDS = {"RayJob", "RayService", "RayCluster"}
NAMESPACED = {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Secret", "Service", "CronJob", "Job", "Pod",
              "Deployment", "StatefulSet", "DaemonSet", "Ingress", *RAY_KINDS}


# ----------------------------------------------------------------------------------------------
# loading: the files, and what `kubectl apply -k cluster/kuberay` creates
# ----------------------------------------------------------------------------------------------

def yaml_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml"))


def _docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _is_k8s(doc: Any) -> bool:
    return isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc and doc.get("kind") != "Kustomization"


def kustomization() -> dict[str, Any]:
    return yaml.safe_load((KUBERAY / "kustomization.yaml").read_text())


_KUSTOMIZE_KEYS = {"apiVersion", "kind", "namespace", "resources", "configMapGenerator", "generatorOptions"}


def render(k: dict[str, Any] | None = None, base: Path = KUBERAY) -> list[dict[str, Any]]:
    """What ``kubectl apply -k`` applies, for the part of kustomize this directory uses (checked by
    :func:`kustomization_problems`): resources, configMapGenerator ``files`` (``key=path`` or ``path``), the
    namespace, no name-suffix hash."""
    k = kustomization() if k is None else k
    objs = [d for r in k.get("resources", []) for d in _docs(base / r) if _is_k8s(d)]
    for gen in k.get("configMapGenerator", []):
        data = {}
        for item in gen.get("files", []):
            key, _, path = item.rpartition("=")
            data[key or PurePosixPath(path).name] = (base / path).read_text()
        objs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": gen["name"]}, "data": data})
    for o in objs:
        if k.get("namespace") and o["kind"] in NAMESPACED:
            o["metadata"]["namespace"] = k["namespace"]
    return objs


def shipped() -> list[dict[str, Any]]:
    """The applied objects plus the objects the CronJob creates from them (manifests inside a ConfigMap)."""
    objs = render()
    for cm in [o for o in objs if o["kind"] == "ConfigMap"]:
        for key, text in cm.get("data", {}).items():
            if key.endswith((".yaml", ".yml")):
                objs += [d for d in yaml.safe_load_all(text) if _is_k8s(d)]
    return objs


def _name(o: dict[str, Any]) -> str:
    return f"{o['kind']}/{o.get('metadata', {}).get('name', '?')}"


def ray_cluster_specs(o: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    spec = o.get("spec") or {}
    key = {"RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}.get(o["kind"])
    if o["kind"] == "RayCluster":
        return [(_name(o), spec)]
    if key and isinstance(spec.get(key), dict):
        return [(f"{_name(o)} {key}", spec[key])]
    return []


def ray_groups(cluster: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    head = cluster.get("headGroupSpec") or {}
    return [("head", head)] + [(f"worker group {g.get('groupName', '?')}", g)
                               for g in cluster.get("workerGroupSpecs") or []]


def pod_templates(o: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(where, pod template spec) of every pod an object creates."""
    spec = o.get("spec") or {}
    kind, name = o["kind"], _name(o)
    if kind == "CronJob":
        return [(name, spec["jobTemplate"]["spec"]["template"])]
    if kind in ("Job", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"):
        return [(name, spec["template"])]
    if kind == "Pod":
        return [(name, {"metadata": o.get("metadata", {}), "spec": spec})]
    if kind == "PodTemplate":
        return [(name, o["template"])]
    out = [(f"{where} {g}", grp["template"]) for where, c in ray_cluster_specs(o)
           for g, grp in ray_groups(c) if isinstance(grp.get("template"), dict)]
    if kind == "RayJob" and isinstance(spec.get("submitterPodTemplate"), dict):
        out.append((f"{name} submitterPodTemplate", spec["submitterPodTemplate"]))
    return out


def containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    pod = template.get("spec") or {}
    return [*(pod.get("initContainers") or []), *(pod.get("containers") or [])]


def serve_config(o: dict[str, Any]) -> dict[str, Any]:
    return yaml.safe_load(o["spec"]["serveConfigV2"]) or {}


def set_serve_config(o: dict[str, Any], cfg: dict[str, Any]) -> None:
    o["spec"]["serveConfigV2"] = yaml.safe_dump(cfg, sort_keys=False)


def serve_deployments() -> dict[str, bool]:
    """Serve deployment class name -> is the HTTP ingress, from pipelines/serve/*.py (read, not imported)."""
    found: dict[str, bool] = {}
    pattern = re.compile(r"^@serve\.deployment\b.*\n((?:@.*\n)*)class (\w+)", re.M)
    for path in sorted((ROOT / "pipelines" / "serve").glob("*.py")):
        for m in pattern.finditer(path.read_text()):
            found[m.group(2)] = "@serve.ingress" in m.group(1)
    return found


# ----------------------------------------------------------------------------------------------
# KubeRay v1 fields (a CRD kubernetes-validate does not know): an allow-list of what these manifests may use
# ----------------------------------------------------------------------------------------------

RAYJOB_SPEC = {"entrypoint": str, "runtimeEnvYAML": str, "jobId": str, "metadata": dict,
               "shutdownAfterJobFinishes": bool, "ttlSecondsAfterFinished": int, "activeDeadlineSeconds": int,
               "backoffLimit": int, "submissionMode": str, "rayClusterSpec": dict, "clusterSelector": dict,
               "submitterPodTemplate": dict, "submitterConfig": dict, "entrypointNumCpus": (int, float),
               "entrypointNumGpus": (int, float), "entrypointResources": str, "suspend": bool, "managedBy": str,
               "deletionStrategy": dict}
RAYSERVICE_SPEC = {"serveConfigV2": str, "rayClusterConfig": dict, "serveService": dict,
                   "excludeHeadPodFromServeSvc": bool, "upgradeStrategy": dict,
                   "serviceUnhealthySecondThreshold": int, "deploymentUnhealthySecondThreshold": int}
CLUSTER_SPEC = {"rayVersion": str, "enableInTreeAutoscaling": bool, "autoscalerOptions": dict,
                "headGroupSpec": dict, "workerGroupSpecs": list, "headServiceAnnotations": dict, "suspend": bool,
                "managedBy": str, "gcsFaultToleranceOptions": dict, "authOptions": dict}
HEAD_GROUP = {"rayStartParams": dict, "template": dict, "serviceType": str, "headService": dict,
              "enableIngress": bool}
WORKER_GROUP = {"groupName": str, "replicas": int, "minReplicas": int, "maxReplicas": int, "rayStartParams": dict,
                "template": dict, "idleTimeoutSeconds": int, "suspend": bool, "scaleStrategy": dict,
                "numOfHosts": int}
AUTH_OPTIONS = {"mode": str}
AUTH_MODES = {"token", "disabled"}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}


def _fields(where: str, obj: Any, allowed: dict[str, Any], required: tuple[str, ...] = ()) -> list[str]:
    if not isinstance(obj, dict):
        return [f"{where}: expected a mapping, got {type(obj).__name__}"]
    out = [f"{where}.{k}: not a KubeRay v1 field used here" for k in obj if k not in allowed]
    out += [f"{where}.{k}: expected {allowed[k]}, got {type(v).__name__}" for k, v in obj.items()
            if k in allowed and (not isinstance(v, allowed[k]) or (allowed[k] is int and isinstance(v, bool)))]
    return out + [f"{where}.{k}: required" for k in required if k not in obj]


def kuberay_field_problems(o: dict[str, Any]) -> list[str]:
    name = _name(o)
    out = [f"{name}: apiVersion {o.get('apiVersion')!r}, expected 'ray.io/v1'"] * (o.get("apiVersion") != "ray.io/v1")
    out += [f"{name}.{k}: unexpected top-level field" for k in o if k not in ("apiVersion", "kind", "metadata", "spec")]
    spec = o.get("spec")
    if o["kind"] == "RayJob":
        out += _fields(f"{name}.spec", spec, RAYJOB_SPEC, ("entrypoint",))
        if (spec or {}).get("submissionMode", "K8sJobMode") not in SUBMISSION_MODES:
            out.append(f"{name}.spec.submissionMode: one of {sorted(SUBMISSION_MODES)}")
        if "runtimeEnvYAML" in (spec or {}) and not isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict):
            out.append(f"{name}.spec.runtimeEnvYAML: not a YAML mapping")
    elif o["kind"] == "RayService":
        out += _fields(f"{name}.spec", spec, RAYSERVICE_SPEC, ("serveConfigV2", "rayClusterConfig"))
        if isinstance((spec or {}).get("serveConfigV2"), str) and not serve_config(o).get("applications"):
            out.append(f"{name}.spec.serveConfigV2: no applications")
    elif o["kind"] == "RayCluster":
        out += _fields(f"{name}.spec", spec, CLUSTER_SPEC, ("headGroupSpec",))
    for where, c in ray_cluster_specs(o):
        if o["kind"] != "RayCluster":
            out += _fields(where, c, CLUSTER_SPEC, ("headGroupSpec",))
        if "authOptions" in c:
            out += _fields(f"{where}.authOptions", c["authOptions"], AUTH_OPTIONS, ("mode",))
            if c["authOptions"].get("mode") not in AUTH_MODES:
                out.append(f"{where}.authOptions.mode: one of {sorted(AUTH_MODES)}")
        for g, grp in ray_groups(c):
            out += _fields(f"{where} {g}", grp, HEAD_GROUP if g == "head" else WORKER_GROUP,
                           ("template",) if g == "head" else ("groupName", "template", "maxReplicas"))
            params = grp.get("rayStartParams") or {}
            out += [f"{where} {g}.rayStartParams.{k}: values are strings in KubeRay v1" for k, v in params.items()
                    if not isinstance(v, str)]
            if g != "head" and all(isinstance(grp.get(k), int) for k in ("minReplicas", "replicas", "maxReplicas")) \
                    and not grp["minReplicas"] <= grp["replicas"] <= grp["maxReplicas"]:
                out.append(f"{where} {g}: minReplicas <= replicas <= maxReplicas does not hold")
    return out


def k8s_validate(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


# ----------------------------------------------------------------------------------------------
# the rules: each returns the problems it finds in a set of objects (empty = the rule holds)
# ----------------------------------------------------------------------------------------------

Objs = list[dict[str, Any]]


def dashboard_problems(objs: Objs) -> list[str]:
    """KubeRay's operator and the RayJob submitter reach the dashboard / job API through the head Service."""
    out = []
    for o in objs:
        for where, c in ray_cluster_specs(o):
            host = ((c.get("headGroupSpec") or {}).get("rayStartParams") or {}).get("dashboard-host", "0.0.0.0")
            if host != "0.0.0.0":
                out.append(f"{where}: dashboard-host {host!r}: the operator and the submitter reach the dashboard "
                           "through the head Service, it must listen on 0.0.0.0 in the pod")
    return out


def _env_vars(o: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(where, name, entry) of every env entry of every container, and every runtime_env env_var."""
    for where, t in pod_templates(o):
        for c in containers(t):
            for e in c.get("env") or []:
                yield f"{where} container {c.get('name')}", e.get("name", ""), e
    spec = o.get("spec") or {}
    envs = []
    if o["kind"] == "RayJob" and isinstance(spec.get("runtimeEnvYAML"), str):
        envs.append(("runtimeEnvYAML", yaml.safe_load(spec["runtimeEnvYAML"]) or {}))
    if o["kind"] == "RayService" and isinstance(spec.get("serveConfigV2"), str):
        envs += [(f"serveConfigV2 application {a.get('name')}", a.get("runtime_env") or {})
                 for a in serve_config(o).get("applications") or []]
    for where, renv in envs:
        for k, v in (renv.get("env_vars") or {}).items():
            yield f"{_name(o)} {where}", k, {"name": k, "value": v}


def auth_problems(objs: Objs) -> list[str]:
    """Token auth on every Ray cluster (KubeRay >= 1.5.1 authOptions), and nothing that turns it off."""
    out = []
    for o in objs:
        for where, c in ray_cluster_specs(o):
            mode = (c.get("authOptions") or {}).get("mode")
            if mode != "token":
                out.append(f"{where}: authOptions.mode is {mode!r}, not 'token'")
        for where, name, e in _env_vars(o):
            if name == "RAY_AUTH_MODE" and e.get("value") != "token":
                out.append(f"{where}: RAY_AUTH_MODE={e.get('value')!r} turns token auth off")
    return out


def exposure_problems(objs: Objs) -> list[str]:
    """Nothing reachable from outside the cluster: ClusterIP services only, no Ingress."""
    out = []
    for o in objs:
        spec = o.get("spec") or {}
        if o["kind"] in ("Ingress", "Gateway", "HTTPRoute"):
            out.append(f"{_name(o)}: exposes the cluster")
        if o["kind"] == "Service" and spec.get("type", "ClusterIP") != "ClusterIP":
            out.append(f"{_name(o)}: type {spec['type']}")
        if o["kind"] == "RayService" and (spec.get("serveService") or {}).get("spec", {}).get("type", "ClusterIP") \
                != "ClusterIP":
            out.append(f"{_name(o)}: serveService type {spec['serveService']['spec']['type']}")
        for where, c in ray_cluster_specs(o):
            head = c.get("headGroupSpec") or {}
            for t in (head.get("serviceType", "ClusterIP"), (head.get("headService") or {}).get("spec", {}).get(
                    "type", "ClusterIP")):
                if t != "ClusterIP":
                    out.append(f"{where}: head service type {t}")
            if head.get("enableIngress"):
                out.append(f"{where}: enableIngress")
    return out


def image_problems(objs: Objs) -> list[str]:
    """Every image pinned and one that exists: kubectl's official image, Ray's of our version, or ours."""
    out = []
    for o in objs:
        for where, t in pod_templates(o):
            for c in containers(t):
                image, what = c.get("image", ""), f"{where} container {c.get('name')}"
                tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
                if not tag or tag == "latest":
                    out.append(f"{what}: image {image!r} is not pinned to a tag")
                elif not (image == PROJECT_IMAGE or KUBECTL_IMAGE.match(image) or RAY_IMAGE.match(image)):
                    out.append(f"{what}: image {image!r} is none of {PROJECT_IMAGE} (cluster/Dockerfile), "
                               f"registry.k8s.io/kubectl:vX.Y.Z, rayproject/ray:{RAY_VERSION}[-pyNNN][-cuNNN]")
                argv = [*(c.get("command") or []), *(c.get("args") or [])]
                if KUBECTL_IMAGE.match(image) and argv and PurePosixPath(argv[0]).name in SHELLS:
                    out.append(f"{what}: {image} is distroless (kubectl only): it has no {argv[0]} to run a script")
        for where, c in ray_cluster_specs(o):
            if c.get("rayVersion") != RAY_VERSION:
                out.append(f"{where}: rayVersion {c.get('rayVersion')!r}, the project pins ray=={RAY_VERSION}")
            for g, grp in ray_groups(c):
                ray = containers(grp.get("template") or {})[:1]
                if ray and ray[0].get("image") != PROJECT_IMAGE:
                    out.append(f"{where} {g}: runs {ray[0].get('image')!r}, not the project image {PROJECT_IMAGE}")
    return out


def _gpus(value: Any) -> int:
    return int(str(value)) if value is not None else 0


def gpu_problems(objs: Objs) -> list[str]:
    """nvidia.com/gpu in the pod = Ray's num-gpus; GPU pods tolerate the GPU taint; on a RayService with GPU
    workers every model deployment asks for GPUs (the ingress none), within what the GPU groups can scale to."""
    out, deployments = [], serve_deployments()
    for o in objs:
        capacity = 0
        for where, c in ray_cluster_specs(o):
            for g, grp in ray_groups(c):
                ray = containers(grp.get("template") or {})[:1]
                res = (ray[0].get("resources") or {}) if ray else {}
                limit = _gpus((res.get("limits") or {}).get("nvidia.com/gpu"))
                request = (res.get("requests") or {}).get("nvidia.com/gpu")
                start = (grp.get("rayStartParams") or {}).get("num-gpus")
                if request is not None and _gpus(request) != limit:
                    out.append(f"{where} {g}: nvidia.com/gpu request {request} != limit {limit}")
                if (limit or _gpus(start)) and _gpus(start) != limit:
                    out.append(f"{where} {g}: rayStartParams num-gpus {start!r} != the pod's nvidia.com/gpu {limit}")
                tolerations = (grp.get("template") or {}).get("spec", {}).get("tolerations") or []
                if limit and not any(t.get("key") == "nvidia.com/gpu" and t.get("operator") == "Exists"
                                     and t.get("effect") == "NoSchedule" for t in tolerations):
                    out.append(f"{where} {g}: GPU pods without the nvidia.com/gpu NoSchedule toleration")
                if g != "head":
                    capacity += limit * int(grp.get("maxReplicas", 0))
        if o["kind"] != "RayService":
            continue
        asked = 0.0
        for app in serve_config(o).get("applications") or []:
            listed = {d.get("name"): d for d in app.get("deployments") or []}
            for dname, d in listed.items():
                where = f"{_name(o)} application {app.get('name')} deployment {dname}"
                if dname not in deployments:
                    out.append(f"{where}: no such Serve deployment in pipelines/serve ({sorted(deployments)})")
                    continue
                gpus = float((d.get("ray_actor_options") or {}).get("num_gpus") or 0)
                scaling = d.get("autoscaling_config") or {}
                if not {"min_replicas", "max_replicas"} <= set(scaling) or "num_replicas" in d:
                    out.append(f"{where}: needs autoscaling_config min_replicas / max_replicas (and no num_replicas)")
                elif not 0 <= scaling["min_replicas"] <= scaling["max_replicas"]:
                    out.append(f"{where}: min_replicas > max_replicas")
                if deployments[dname] and gpus:
                    out.append(f"{where}: the HTTP ingress asks for {gpus} GPUs")
                asked += gpus * float(scaling.get("max_replicas", 0))
            for dname, ingress in deployments.items():
                d = listed.get(dname, {})
                if capacity and not ingress and not (d.get("ray_actor_options") or {}).get("num_gpus"):
                    out.append(f"{_name(o)} application {app.get('name')}: model deployment {dname} has no "
                               "ray_actor_options.num_gpus although the worker groups have GPUs")
        if asked > capacity:
            out.append(f"{_name(o)}: deployments may ask for {asked:g} GPUs, the GPU worker groups give {capacity}")
    return out


_AWS_KEY_ID = re.compile(r"(?<![A-Z0-9])(AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])")
_AWS_SECRET = re.compile(r"(?i)aws_?secret_?access_?key\W{0,3}[:=]\s*[\"']?[A-Za-z0-9/+]{40}")
_SECRET_NAME = re.compile(r"(?i)(^|_)(SECRET|TOKEN|PASSWORD|PASSWD|ACCESS_KEY|CREDENTIALS?|API_KEY)(_|$)")


def secret_text_problems(where: str, text: str) -> list[str]:
    return [f"{where}: looks like an AWS {what}" for what, rx in (("access key id", _AWS_KEY_ID),
                                                                  ("secret access key", _AWS_SECRET))
            if rx.search(text)]


def secret_problems(objs: Objs) -> list[str]:
    """No credential written into a manifest: no Secret with data, no secret-named env var with a literal value."""
    out = []
    for o in objs:
        out += secret_text_problems(_name(o), yaml.safe_dump(o))
        if o["kind"] == "Secret" and (o.get("data") or o.get("stringData")):
            out.append(f"{_name(o)}: a Secret with its data in the manifests")
        for where, name, e in _env_vars(o):
            if _SECRET_NAME.search(name) and "value" in e:
                out.append(f"{where}: {name} has a literal value (use IRSA, or a Secret referenced by name)")
    return out


def _config_maps(objs: Objs) -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["metadata"].get("namespace", ""), o["metadata"]["name"]): o for o in objs if o["kind"] == "ConfigMap"}


def entrypoint_problems(objs: Objs) -> list[str]:
    """The RayJob runs `mmrerank run <file>`, the file comes from a shipped ConfigMap mounted on the head (where
    the driver runs), and it is a valid config whose root the RayService serves."""
    out, cms, roots = [], _config_maps(objs), []
    for o in [o for o in objs if o["kind"] == "RayJob"]:
        name, spec = _name(o), o.get("spec") or {}
        argv = shlex.split(spec.get("entrypoint", ""))
        if argv[:2] != ["mmrerank", "run"] or len(argv) < 3 or not argv[2].startswith("/"):
            out.append(f"{name}: entrypoint {spec.get('entrypoint')!r} is not `mmrerank run /path/to/config.yaml`")
            continue
        path = PurePosixPath(argv[2])
        head = (spec.get("rayClusterSpec") or {}).get("headGroupSpec", {}).get("template") or {}
        pod = head.get("spec") or {}
        volumes = {v.get("name"): v for v in pod.get("volumes") or []}
        text, ray = None, (pod.get("containers") or [{}])[0]
        for m in ray.get("volumeMounts") or []:
            mount = PurePosixPath(m.get("mountPath", "/-"))
            if mount not in path.parents:
                continue
            cm_ref = (volumes.get(m.get("name")) or {}).get("configMap") or {}
            key = str(path.relative_to(mount))
            for item in cm_ref.get("items") or []:
                if item.get("path") == key:
                    key = item["key"]
            cm = cms.get((o["metadata"].get("namespace", ""), cm_ref.get("name")))
            if cm is not None and key in (cm.get("data") or {}):
                text = cm["data"][key]
        if text is None:
            out.append(f"{name}: no shipped ConfigMap mounted on the head's {ray.get('name')} provides {path}")
            continue
        try:
            data = yaml.safe_load(text)
            cfg = parse_config(data, f"{name} {path}")
        except (ConfigError, yaml.YAMLError) as e:
            out.append(f"{name}: {path}: {e}")
            continue
        if any(k in (data.get("storage") or {}) for k in ("access_key_id", "secret_access_key", "session_token")):
            out.append(f"{name}: {path} holds storage credentials")
        if "://" not in cfg.root:
            out.append(f"{name}: {path}: root {cfg.root!r} is a pod-local path, gone with the pod")
        roots.append(cfg.root)
    for o in [o for o in objs if o["kind"] == "RayService"]:
        for app in serve_config(o).get("applications") or []:
            served = ((app.get("runtime_env") or {}).get("env_vars") or {}).get("MMRERANK_ROOT")
            if roots and served not in roots:
                out.append(f"{_name(o)}: serves MMRERANK_ROOT {served!r}, the nightly run writes {roots}")
    return out


_TERMINAL = ("Complete", "Failed")


def cronjob_problems(objs: Objs) -> list[str]:
    """Bounded history, and the script refuses to start while an earlier night's RayJob is still active; the
    RayJobs it creates shut their cluster down and are labelled for that check."""
    out, cms = [], _config_maps(objs)
    for o in [o for o in objs if o["kind"] == "CronJob"]:
        name, spec = _name(o), o.get("spec") or {}
        for k in ("successfulJobsHistoryLimit", "failedJobsHistoryLimit"):
            if not isinstance(spec.get(k), int) or not 0 <= spec[k] <= 10:
                out.append(f"{name}: {k} must be set (0..10), got {spec.get(k)!r}")
        if spec.get("concurrencyPolicy") != "Forbid":
            out.append(f"{name}: concurrencyPolicy {spec.get('concurrencyPolicy')!r}, expected Forbid")
        template = spec.get("jobTemplate", {}).get("spec", {}).get("template") or {}
        script = "\n".join(str(a) for c in containers(template) for a in [*(c.get("command") or []),
                                                                            *(c.get("args") or [])])
        selector = re.search(r"kubectl get rayjobs?\b.*?-l\s+(\S+?)=(\S+)", script)
        if not selector:
            out.append(f"{name}: the script does not list earlier RayJobs (`kubectl get rayjobs -l key=value`)")
        if "jobDeploymentStatus" not in script or not all(s in script for s in _TERMINAL) or "exit 1" not in script:
            out.append(f"{name}: the script does not refuse (exit 1) while a RayJob's jobDeploymentStatus is not "
                       f"terminal ({', '.join(_TERMINAL)})")
        if not re.search(r"kubectl delete rayjobs?\b", script):
            out.append(f"{name}: the script never deletes finished RayJobs (unbounded history)")
        # The RayJob it creates: the manifest in a ConfigMap its pod mounts.
        pod = template.get("spec") or {}
        mounted = [(v.get("configMap") or {}).get("name") for v in pod.get("volumes") or []]
        texts = [t for n in mounted if (cm := cms.get((o["metadata"].get("namespace", ""), n)))
                 for t in (cm.get("data") or {}).values()]
        jobs = [(text, d) for text in texts for d in yaml.safe_load_all(text) if _is_k8s(d) and d["kind"] == "RayJob"]
        if not jobs:
            out.append(f"{name}: no RayJob manifest in its mounted ConfigMaps")
        for text, job in jobs:
            jspec, jname = job.get("spec") or {}, job["metadata"]["name"]
            if job["metadata"].get("namespace", o["metadata"].get("namespace")) != o["metadata"].get("namespace"):
                out.append(f"{name}: RayJob {jname} names namespace {job['metadata']['namespace']!r}, "
                           f"the CronJob creates it in {o['metadata'].get('namespace')!r}")
            if jspec.get("shutdownAfterJobFinishes") is not True:
                out.append(f"{name}: RayJob {jname} lacks shutdownAfterJobFinishes: true")
            if not isinstance(jspec.get("ttlSecondsAfterFinished"), int):
                out.append(f"{name}: RayJob {jname} lacks ttlSecondsAfterFinished")
            if selector and (job["metadata"].get("labels") or {}).get(selector.group(1)) != selector.group(2):
                out.append(f"{name}: RayJob {jname} lacks the label {selector.group(1)}={selector.group(2)} "
                           "the script checks")
            # The script renames it per night with sed on its one `  name:` line (metadata.name).
            if f"s/^  name: {jname}\\$/" not in script or text.splitlines().count(f"  name: {jname}") != 1:
                out.append(f"{name}: the script does not rename RayJob {jname} per night (its one `  name:` line)")
    return out


def reference_problems(objs: Objs) -> list[str]:
    """Every ServiceAccount, ConfigMap and Role a manifest names is shipped; Secrets (never shipped) optional."""
    out = []
    have = {(o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]) for o in objs}

    def need(kind: str, ns: str, name: str, where: str) -> None:
        if (kind, ns, name) not in have:
            out.append(f"{where}: {kind} {ns}/{name} is not shipped")

    for o in objs:
        ns = o["metadata"].get("namespace", "")
        for where, t in pod_templates(o):
            pod = t.get("spec") or {}
            if pod.get("serviceAccountName"):
                need("ServiceAccount", ns, pod["serviceAccountName"], where)
            for v in pod.get("volumes") or []:
                if "configMap" in v and not v["configMap"].get("optional"):
                    need("ConfigMap", ns, v["configMap"]["name"], f"{where} volume {v.get('name')}")
                if "secret" in v and not v["secret"].get("optional"):
                    out.append(f"{where} volume {v.get('name')}: Secret {v['secret'].get('secretName')} must be "
                               "optional (credentials are created by hand or replaced by IRSA)")
            for c in containers(t):
                refs = [(s, r) for e in c.get("envFrom") or [] for s, r in e.items() if s.endswith("Ref")]
                refs += [(s, r) for e in c.get("env") or [] for s, r in (e.get("valueFrom") or {}).items()
                         if s in ("configMapKeyRef", "secretKeyRef")]
                for s, r in refs:
                    if s.startswith("configMap") and not r.get("optional"):
                        need("ConfigMap", ns, r["name"], f"{where} container {c.get('name')}")
                    if s.startswith("secret") and not r.get("optional"):
                        out.append(f"{where} container {c.get('name')}: Secret {r.get('name')} must be optional")
        if o["kind"] == "RoleBinding":
            need(o["roleRef"]["kind"], ns if o["roleRef"]["kind"] == "Role" else "", o["roleRef"]["name"], _name(o))
            for s in o.get("subjects") or []:
                if s.get("kind") == "ServiceAccount":
                    need("ServiceAccount", s.get("namespace", ns), s["name"], _name(o))
        if o["kind"] in NAMESPACED and ("Namespace", "", ns) not in have:
            out.append(f"{_name(o)}: namespace {ns!r} is not shipped")
    return out


SCHEDULER_VERBS = {"get", "list", "create", "patch", "delete"}


def rbac_problems(objs: Objs) -> list[str]:
    """Namespaced and narrow: the scheduler may get/list/create/patch/delete rayjobs.ray.io, nothing else."""
    out = [f"{_name(o)}: cluster-wide RBAC" for o in objs if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    for o in [o for o in objs if o["kind"] == "Role"]:
        for r in o.get("rules") or []:
            if "*" in [*r.get("apiGroups", []), *r.get("resources", []), *r.get("verbs", [])]:
                out.append(f"{_name(o)}: a wildcard rule {r}")
            if r.get("apiGroups") != ["ray.io"] or r.get("resources") != ["rayjobs"] \
                    or set(r.get("verbs", [])) != SCHEDULER_VERBS:
                out.append(f"{_name(o)}: rule {r}: expected verbs {sorted(SCHEDULER_VERBS)} on ray.io rayjobs only")
    return out


RULES: dict[str, Callable[[Objs], list[str]]] = {
    "dashboard": dashboard_problems, "auth": auth_problems, "exposure": exposure_problems,
    "images": image_problems, "gpus": gpu_problems, "secrets": secret_problems, "entrypoint": entrypoint_problems,
    "cronjob": cronjob_problems, "references": reference_problems, "rbac": rbac_problems,
}


def kustomization_problems(k: dict[str, Any], base: Path = KUBERAY) -> list[str]:
    out = [f"kustomization: {key} is not emulated by this test's render()" for key in k if key not in _KUSTOMIZE_KEYS]
    listed = list(k.get("resources", [])) + [item.rpartition("=")[2] for gen in k.get("configMapGenerator", [])
                                             for item in gen.get("files", [])]
    out += [f"kustomization lists {p}, which does not exist" for p in listed if not (base / p).is_file()]
    files = {p.name for p in base.iterdir() if p.suffix in (".yaml", ".yml") and p.name != "kustomization.yaml"}
    out += [f"{f} is not in the kustomization" for f in sorted(files - set(listed))]
    if k.get("configMapGenerator") and not (k.get("generatorOptions") or {}).get("disableNameSuffixHash"):
        out.append("kustomization: generated ConfigMaps get a hash suffix that the RayJob's volume would not follow")
    return out


def aws_problems(cfg: dict[str, Any]) -> list[str]:
    """`ray up` config: token auth on every node (ray start enables it only with RAY_AUTH_MODE=token), the token
    file mounted, the dashboard on the head's loopback (jobs go through the head: SSH tunnel or ray attach)."""
    out = []
    starts = [(k, c) for k in ("head_start_ray_commands", "worker_start_ray_commands") for c in cfg.get(k) or []
              if re.search(r"\bray start\b", c)]
    if len(starts) < 2:
        out.append("no `ray start` in head_start_ray_commands and worker_start_ray_commands")
    for k, c in starts:
        if not re.search(r"(^|\s)RAY_AUTH_MODE=token\s", c):
            out.append(f"{k}: {c!r} starts Ray without RAY_AUTH_MODE=token")
        if "--head" in c and "--dashboard-host=127.0.0.1" not in c:
            out.append(f"{k}: the dashboard must stay on the head's loopback (jobs are submitted through the head)")
    text = yaml.safe_dump(cfg)
    if re.search(r"RAY_AUTH_MODE=(?!token)", text):
        out.append("RAY_AUTH_MODE set to something other than token")
    if "~/.ray/auth_token" not in (cfg.get("file_mounts") or {}):
        out.append("file_mounts does not put the cluster's token (~/.ray/auth_token) on the nodes")
    return out + secret_text_problems("cluster/aws/ray-cluster.yaml", text)


# ----------------------------------------------------------------------------------------------
# the shipped manifests
# ----------------------------------------------------------------------------------------------

SHIPPED = shipped()


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(CLUSTER)))
def test_every_yaml_parses(path: Path) -> None:
    assert _docs(path), f"{path} is empty"


@pytest.mark.parametrize("obj", [o for o in SHIPPED if o["kind"] not in RAY_KINDS], ids=_name)
def test_kubernetes_schema(obj: dict[str, Any]) -> None:
    k8s_validate(obj)


@pytest.mark.parametrize("obj", [o for o in SHIPPED if o["kind"] in RAY_KINDS], ids=_name)
def test_kuberay_objects(obj: dict[str, Any]) -> None:
    assert kuberay_field_problems(obj) == []
    templates = pod_templates(obj)
    assert templates
    for where, t in templates:
        k8s_validate({"apiVersion": "v1", "kind": "PodTemplate",
                      "metadata": {"name": re.sub(r"[^a-z0-9-]+", "-", where.lower()).strip("-")}, "template": t})


def test_every_kind_is_checked() -> None:
    kinds = {o["kind"] for o in SHIPPED}
    assert {"Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "CronJob", "RayJob",
            "RayService"} <= kinds
    # Every Kubernetes object of every file is one the kustomization applies or the CronJob creates.
    in_files = {_name(d) for p in KUBERAY.glob("*.yaml") for d in _docs(p) if _is_k8s(d)}
    assert in_files <= {_name(o) for o in SHIPPED}


@pytest.mark.parametrize("rule", RULES)
def test_rule_holds(rule: str) -> None:
    assert RULES[rule](copy.deepcopy(SHIPPED)) == []


def test_kustomization() -> None:
    assert kustomization_problems(kustomization()) == []


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl on PATH")
def test_render_is_what_kustomize_builds() -> None:
    """render() (what every test here checks) equals `kubectl kustomize cluster/kuberay` (no cluster needed)."""
    built = subprocess.run(["kubectl", "kustomize", str(KUBERAY)], capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    by_name = lambda objs: sorted(objs, key=lambda o: (o["kind"], o["metadata"]["name"]))  # noqa: E731
    assert by_name([d for d in yaml.safe_load_all(built.stdout) if d]) == by_name(render())


def test_nightly_config_validates_as_a_file() -> None:
    """`mmrerank validate cluster/kuberay/nightly-config.yaml` (what the walk-through tells an operator to run)."""
    from pipelines.config import load_config

    assert load_config(KUBERAY / "nightly-config.yaml").root.startswith("s3://")


def test_rules_cover_the_serve_app() -> None:
    deployments = serve_deployments()
    assert deployments.get("Api") is True and deployments.get("LiveModels") is False, deployments


def test_aws_launcher_config() -> None:
    assert aws_problems(yaml.safe_load(AWS.read_text())) == []


def test_no_inline_secret_in_any_file() -> None:
    found = [p for f in sorted(CLUSTER.rglob("*")) if f.is_file() and "__pycache__" not in f.parts
             for p in secret_text_problems(str(f.relative_to(ROOT)), f.read_text(errors="replace"))]
    assert found == []


def test_dockerfile() -> None:
    text = DOCKERFILE.read_text()
    assert _BUILD, "cluster/Dockerfile documents no `docker build -f cluster/Dockerfile -t IMAGE .`"
    assert f"docker push {PROJECT_IMAGE}" in text
    assert PROJECT_IMAGE.rsplit(":", 1)[1].startswith(PROJECT_VERSION + "-"), (PROJECT_IMAGE, PROJECT_VERSION)
    base = re.search(r"^ARG RAY_IMAGE=(\S+)$", text, re.M)
    assert base and re.fullmatch(rf"rayproject/ray:{re.escape(RAY_VERSION)}-py311-cu\d+", base.group(1)), base
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert froms[-1] == "${RAY_IMAGE}"
    assert all(f == "${RAY_IMAGE}" or KUBECTL_IMAGE.match(f) for f in froms), froms
    assert re.search(r'pip install [^\n]*-c \.ci/constraints\.txt "\.\[gpu[,\]]', text)
    assert "faiss-gpu-cu12==" in text and "pip uninstall -y faiss-cpu" in text
    ignore = (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines()
    for copied in re.findall(r"^COPY (?!--from)(?:--chown=\S+ )?(.+) \S+$", text, re.M):
        for src in copied.split():
            assert f"!{src}" in ignore or f"!{src}/" in ignore, f"{src} is copied but excluded from the context"
    # Every Ray pod runs the image this file builds (the rule in image_problems), the docs say how to build it.
    assert f"docker build -f cluster/Dockerfile -t {PROJECT_IMAGE} ." in (ROOT / "docs" / "cluster.md").read_text()


# ----------------------------------------------------------------------------------------------
# the CronJob's script, run by /bin/sh against a stand-in kubectl that answers from a file
# ----------------------------------------------------------------------------------------------

_STUB_KUBECTL = """#!/bin/sh
printf "%s\\n" "$*" >> "$STUB_DIR/calls"
case "$1" in
  get) cat "$STUB_DIR/jobs" ;;
  create) cat > "$STUB_DIR/created.yaml" ;;
esac
"""


def _run_cron_script(tmp_path: Path, jobs: list[tuple[str, str, str]]) -> tuple[int, str, Path]:
    """Run the CronJob's container command with `kubectl get rayjobs` answering ``jobs`` (oldest first)."""
    cron = _one(SHIPPED, "CronJob")
    c = _cron_container([cron])
    env_values = {e["name"]: e.get("value") for e in c["env"]}
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "kubectl").write_text(_STUB_KUBECTL)
    (stub / "kubectl").chmod(0o755)
    (tmp_path / "jobs").write_text("".join("\t".join(j) + "\n" for j in jobs))
    (tmp_path / "calls").write_text("")
    manifest = tmp_path / "rayjob-nightly.yaml"
    manifest.write_text(_one(SHIPPED, "ConfigMap", "mmrerank-rayjob")["data"][PurePosixPath(
        env_values["RAYJOB_MANIFEST"]).name])
    env = {"PATH": f"{stub}:{os.environ['PATH']}", "STUB_DIR": str(tmp_path), "NAMESPACE": "mmrerank",
           "KEEP_FINISHED": env_values["KEEP_FINISHED"], "RAYJOB_MANIFEST": str(manifest)}
    proc = subprocess.run([*c["command"], *c["args"]], env=env, capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stderr, tmp_path


@pytest.mark.parametrize("status", [("Running", "RUNNING"), ("Initializing", ""), ("", ""), ("Retrying", "FAILED"),
                                    ("Suspended", "STOPPED")])
def test_cron_script_refuses_while_a_rayjob_is_active(tmp_path: Path, status: tuple[str, str]) -> None:
    rc, err, out = _run_cron_script(tmp_path, [("mmrerank-nightly-20260101-0130", "Complete", "SUCCEEDED"),
                                               ("mmrerank-nightly-20260102-0130", *status)])
    assert rc == 1 and "mmrerank-nightly-20260102-0130" in err, err
    calls = (out / "calls").read_text().splitlines()
    assert len(calls) == 1 and calls[0].startswith("get rayjobs -n mmrerank -l app=mmrerank-nightly"), calls
    assert not (out / "created.yaml").exists()


def test_cron_script_prunes_history_and_creates_tonights_rayjob(tmp_path: Path) -> None:
    keep = int(_cron_container(SHIPPED)["env"][1]["value"])
    finished = [(f"mmrerank-nightly-202601{d:02d}-0130", "Failed" if d % 3 else "Complete", "SUCCEEDED")
                for d in range(1, keep + 3)] + [("mmrerank-nightly-20260120-0130", "ValidationFailed", "")]
    rc, err, out = _run_cron_script(tmp_path, finished)
    assert rc == 0, err
    calls = (out / "calls").read_text().splitlines()
    assert calls[1] == "delete rayjob -n mmrerank " + " ".join(n for n, *_ in finished[:len(finished) - keep])
    assert calls[2] == "create -n mmrerank -f -"
    created = yaml.safe_load((out / "created.yaml").read_text())
    original = _one(SHIPPED, "RayJob")
    assert re.fullmatch(r"mmrerank-nightly-\d{8}-\d{4}", created["metadata"]["name"]), created["metadata"]
    assert len(created["metadata"]["name"]) <= 47  # KubeRay's limit on a RayJob name
    created["metadata"]["name"] = original["metadata"]["name"]
    assert created == original  # only the name changed


def test_cron_script_first_night(tmp_path: Path) -> None:
    rc, err, out = _run_cron_script(tmp_path, [])
    assert rc == 0, err
    assert [c.split()[0] for c in (out / "calls").read_text().splitlines()] == ["get", "create"]


# ----------------------------------------------------------------------------------------------
# each rule fails when an original problem of issue #32 (and a few more) is put back
# ----------------------------------------------------------------------------------------------

def _one(objs: Objs, kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, (kind, name, [_name(o) for o in found])
    return found[0]


def _cluster(objs: Objs, kind: str) -> dict[str, Any]:
    return ray_cluster_specs(_one(objs, kind))[0][1]


def _gpu_group(objs: Objs, kind: str) -> dict[str, Any]:
    return next(g for g in _cluster(objs, kind)["workerGroupSpecs"]
                if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"])


def _cron_container(objs: Objs) -> dict[str, Any]:
    return _one(objs, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]


def _script_without(objs: Objs, word: str) -> None:
    c = _cron_container(objs)
    c["args"] = ["\n".join(line for line in c["args"][0].splitlines() if word not in line)]


def _serve_edit(objs: Objs, edit: Callable[[dict[str, Any]], None], whole_app: bool = False) -> None:
    """Edit the RayService's application (whole_app) or its deployments by name, through serveConfigV2's text."""
    o = _one(objs, "RayService")
    cfg = serve_config(o)
    app = cfg["applications"][0]
    edit(app if whole_app else {d["name"]: d for d in app["deployments"]})
    set_serve_config(o, cfg)


def _rayjob_config(objs: Objs, edit: Callable[[dict[str, Any]], None]) -> None:
    cm = _one(objs, "ConfigMap", "mmrerank-config")
    data = yaml.safe_load(cm["data"]["config.yaml"])
    edit(data)
    cm["data"]["config.yaml"] = yaml.safe_dump(data)


def _head_env(objs: Objs, kind: str, env: dict[str, str]) -> None:
    c = _cluster(objs, kind)["headGroupSpec"]["template"]["spec"]["containers"][0]
    c.setdefault("env", []).extend({"name": k, "value": v} for k, v in env.items())


BREAKS: dict[str, tuple[str, Callable[[Objs], Any]]] = {
    # 1. the dashboard on loopback in the KubeRay head groups
    "rayjob-dashboard-127.0.0.1": ("dashboard", lambda objs: _cluster(objs, "RayJob")["headGroupSpec"][
        "rayStartParams"].update({"dashboard-host": "127.0.0.1"})),
    "rayservice-dashboard-127.0.0.1": ("dashboard", lambda objs: _cluster(objs, "RayService")["headGroupSpec"][
        "rayStartParams"].update({"dashboard-host": "127.0.0.1"})),
    # 2. token auth not set, or turned off
    "rayjob-no-authOptions": ("auth", lambda objs: _cluster(objs, "RayJob").pop("authOptions")),
    "rayservice-no-authOptions": ("auth", lambda objs: _cluster(objs, "RayService").pop("authOptions")),
    "rayservice-auth-disabled": ("auth", lambda objs: _cluster(objs, "RayService").update(
        {"authOptions": {"mode": "disabled"}})),
    "rayjob-env-RAY_AUTH_MODE-disabled": ("auth", lambda objs: _head_env(objs, "RayJob",
                                                                         {"RAY_AUTH_MODE": "disabled"})),
    # 3. the CronJob's image
    "cronjob-bitnami-kubectl-1.31": ("images", lambda objs: _cron_container(objs).update(
        {"image": "bitnami/kubectl:1.31"})),
    "cronjob-distroless-kubectl-running-sh": ("images", lambda objs: _cron_container(objs).update(
        {"image": "registry.k8s.io/kubectl:v1.31.4"})),
    "rayjob-image-latest": ("images", lambda objs: _cluster(objs, "RayJob")["headGroupSpec"]["template"]["spec"][
        "containers"][0].update({"image": PROJECT_IMAGE.rsplit(":", 1)[0] + ":latest"})),
    "rayservice-other-ray-version": ("images", lambda objs: _cluster(objs, "RayService").update(
        {"rayVersion": "2.9.0"})),
    # 4. the RayService's model deployment without GPUs, or GPUs that do not add up
    "rayservice-no-num_gpus": ("gpus", lambda objs: _serve_edit(objs, lambda d: d["LiveModels"][
        "ray_actor_options"].pop("num_gpus"))),
    "rayservice-no-deployments": ("gpus", lambda objs: _serve_edit(objs, lambda a: a.pop("deployments"), True)),
    "rayservice-no-autoscaling": ("gpus", lambda objs: _serve_edit(objs, lambda d: d["LiveModels"].pop(
        "autoscaling_config"))),
    "rayservice-more-replicas-than-gpus": ("gpus", lambda objs: _serve_edit(objs, lambda d: d["LiveModels"][
        "autoscaling_config"].update({"max_replicas": 64}))),
    "rayservice-gpu-on-the-ingress": ("gpus", lambda objs: _serve_edit(objs, lambda d: d["Api"][
        "ray_actor_options"].update({"num_gpus": 1}))),
    "rayjob-num-gpus-not-the-limit": ("gpus", lambda objs: _gpu_group(objs, "RayJob")["rayStartParams"].update(
        {"num-gpus": "2"})),
    "rayjob-gpu-without-toleration": ("gpus", lambda objs: _gpu_group(objs, "RayJob")["template"]["spec"].pop(
        "tolerations")),
    # 5. the CronJob: unbounded history, no check for a running RayJob, RayJobs that never clean up
    "cronjob-no-successfulJobsHistoryLimit": ("cronjob", lambda objs: _one(objs, "CronJob")["spec"].pop(
        "successfulJobsHistoryLimit")),
    "cronjob-no-failedJobsHistoryLimit": ("cronjob", lambda objs: _one(objs, "CronJob")["spec"].pop(
        "failedJobsHistoryLimit")),
    "cronjob-no-running-check": ("cronjob", lambda objs: _script_without(objs, "jobDeploymentStatus")),
    "cronjob-no-cleanup": ("cronjob", lambda objs: _script_without(objs, "kubectl delete")),
    "cronjob-original-script": ("cronjob", lambda objs: _cron_container(objs).update({"args": [
        'sed "s/name: mmrerank-nightly/name: mmrerank-nightly-$(date -u +%Y%m%d)/" '
        "/etc/mmrerank-job/rayjob-nightly.yaml | kubectl apply -f -"]})),
    "rayjob-other-namespace": ("cronjob", lambda objs: _one(objs, "CronJob")["metadata"].update(
        {"namespace": "elsewhere"})),
    "cronjob-concurrency-allow": ("cronjob", lambda objs: _one(objs, "CronJob")["spec"].update(
        {"concurrencyPolicy": "Allow"})),
    "rayjob-no-ttl": ("cronjob", lambda objs: _one(objs, "ConfigMap", "mmrerank-rayjob")["data"].update(
        {"rayjob-nightly.yaml": _one(objs, "ConfigMap", "mmrerank-rayjob")["data"]["rayjob-nightly.yaml"].replace(
            "ttlSecondsAfterFinished", "# ttlSecondsAfterFinished")})),
    # 6.-7. and the rest
    "service-loadbalancer": ("exposure", lambda objs: _cluster(objs, "RayService")["headGroupSpec"].update(
        {"serviceType": "LoadBalancer"})),
    "ingress": ("exposure", lambda objs: objs.append(
        {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "dash"}, "spec": {}})),
    "inline-aws-secret": ("secrets", lambda objs: _head_env(objs, "RayJob", {"AWS_SECRET_ACCESS_KEY": "x" * 40})),
    "inline-aws-key-id": ("secrets", lambda objs: _head_env(objs, "RayService",
                                                            {"AWS_ACCESS_KEY_ID": "AKIA" + "ABCDEFGHIJKLMNOP"})),
    "entrypoint-not-mmrerank-run": ("entrypoint", lambda objs: _one(objs, "RayJob")["spec"].update(
        {"entrypoint": "python -c 'print(1)'"})),
    "entrypoint-config-not-shipped": ("entrypoint", lambda objs: _one(objs, "RayJob")["spec"].update(
        {"entrypoint": "mmrerank run /etc/mmrerank/other.yaml"})),
    "entrypoint-config-invalid": ("entrypoint", lambda objs: _rayjob_config(
        objs, lambda c: c["embed"].update({"batch_size": 0}))),
    "entrypoint-config-unknown-field": ("entrypoint", lambda objs: _rayjob_config(
        objs, lambda c: c.update({"bucket": "x"}))),
    "serve-root-not-the-nightly-root": ("entrypoint", lambda objs: _one(objs, "RayService")["spec"].update(
        {"serveConfigV2": _one(objs, "RayService")["spec"]["serveConfigV2"].replace(
            "MMRERANK_ROOT: s3://my-bucket/mmrerank/out", "MMRERANK_ROOT: s3://other/out")})),
    "config-root-pod-local": ("entrypoint", lambda objs: _rayjob_config(objs, lambda c: c.update(
        {"root": "/tmp/out"}))),
    "configmap-not-shipped": ("references", lambda objs: objs.remove(_one(objs, "ConfigMap", "mmrerank-config"))),
    "serviceaccount-not-shipped": ("references", lambda objs: objs.remove(
        _one(objs, "ServiceAccount", "mmrerank-reader"))),
    "secret-not-optional": ("references", lambda objs: _cluster(objs, "RayJob")["headGroupSpec"]["template"][
        "spec"]["containers"][0]["envFrom"][0]["secretRef"].pop("optional")),
    "clusterrole": ("rbac", lambda objs: objs.append(
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole", "metadata": {"name": "x"}})),
    "role-wildcard-verbs": ("rbac", lambda objs: _one(objs, "Role")["rules"][0].update({"verbs": ["*"]})),
}


@pytest.mark.parametrize("case", BREAKS)
def test_rule_reports_a_reintroduced_problem(case: str) -> None:
    rule, breaks = BREAKS[case]
    objs = copy.deepcopy(SHIPPED)
    breaks(objs)
    assert RULES[rule](objs), f"{rule} did not report {case}"
    assert RULES[rule](copy.deepcopy(SHIPPED)) == []  # the copy, not the shipped set, was broken


def _aws_edit(edit: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    cfg = yaml.safe_load(AWS.read_text())
    edit(cfg)
    return cfg


@pytest.mark.parametrize("case, edit", [
    ("head-without-token-auth", lambda c: c["head_start_ray_commands"].__setitem__(
        -1, c["head_start_ray_commands"][-1].replace("RAY_AUTH_MODE=token ", ""))),
    ("worker-without-token-auth", lambda c: c["worker_start_ray_commands"].__setitem__(
        -1, c["worker_start_ray_commands"][-1].replace("RAY_AUTH_MODE=token ", ""))),
    ("auth-disabled", lambda c: c["setup_commands"].append("export RAY_AUTH_MODE=disabled")),
    ("no-token-file", lambda c: c.pop("file_mounts")),
    ("dashboard-on-all-interfaces", lambda c: c["head_start_ray_commands"].__setitem__(
        -1, c["head_start_ray_commands"][-1].replace("127.0.0.1", "0.0.0.0"))),
])
def test_aws_rule_reports_a_reintroduced_problem(case: str, edit: Callable[[dict[str, Any]], None]) -> None:
    assert aws_problems(_aws_edit(edit)), case


@pytest.mark.parametrize("case, edit", [
    ("unlisted-manifest", lambda k: k["resources"].remove("rayservice.yaml")),
    ("listed-but-missing", lambda k: k["resources"].append("missing.yaml")),
    ("hash-suffix", lambda k: k.pop("generatorOptions")),
    ("unemulated-key", lambda k: k.update({"patches": []})),
])
def test_kustomization_rule_reports(case: str, edit: Callable[[dict[str, Any]], None]) -> None:
    k = kustomization()
    edit(k)
    assert kustomization_problems(k), case


def test_schema_validation_fails_on_a_broken_object() -> None:
    """kubernetes-validate (strict) really checks: an unknown field and a wrong type are errors."""
    cron = copy.deepcopy(_one(SHIPPED, "CronJob"))
    cron["spec"]["historyLimit"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        k8s_validate(cron)
    job = copy.deepcopy(_one(SHIPPED, "RayJob"))
    head = ray_cluster_specs(job)[0][1]["headGroupSpec"]["template"]
    head["spec"]["containers"][0]["resources"]["limits"] = "4"
    with pytest.raises(kubernetes_validate.ValidationError):
        k8s_validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "h"}, "template": head})
    ray_cluster_specs(job)[0][1]["headGroupSpec"]["rayStartParam"] = {}
    assert kuberay_field_problems(job)
