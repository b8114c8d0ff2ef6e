"""deploy/kubernetes, checked offline: every manifest and every rendered overlay against the
Kubernetes schemas shipped in kubernetes-validate's wheel, the overlays' patches against what the
base defines, and the manifests against the code (settings, routes, entrypoint roles, the Celery
queue KEDA watches).

The overlays are rendered here by a small kustomize (resources, components, strategic-merge
patches of named list items, images, labels): enough for these files, no more. Where ``kubectl``
or ``kustomize`` is installed, its rendering must agree. KEDA's ``ScaledObject`` is a custom
resource that kubernetes-validate has no schema for: it gets a structural check of its own.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from service.config import Settings
from service.models.spec import load_config
from service.runtime.jobs.celery_app import make_celery, queue_name

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.30"  # the oldest release these manifests target (HPA v2 behaviour, probes)
OVERLAYS = ["base", "overlays/gpu", "overlays/gpu-keda"]
CUSTOM_KINDS = {"ScaledObject"}  # CRDs: no schema in kubernetes-validate
ENTRYPOINT_ROLES = {"serve", "worker", "healthcheck", "openapi"}

Doc = dict[str, Any]


def load_docs(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def patch_files() -> set[Path]:
    """Files that kustomizations use as patches: partial objects, validated once applied."""
    out = set()
    for kust in K8S.rglob("kustomization.yaml"):
        for patch in yaml.safe_load(kust.read_text()).get("patches", []):
            out.add((kust.parent / patch["path"]).resolve())
    return out


def manifest_files() -> list[Path]:
    """Every complete manifest (not kustomizations, not patches)."""
    skip = patch_files()
    return sorted(
        p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml" and p.resolve() not in skip
    )


def key(doc: Doc) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


# --- a small kustomize ---------------------------------------------------------------------------
def merge(base: Any, patch: Any) -> Any:
    """Strategic merge as kustomize does it for these files: maps merge key by key, lists of
    maps with a ``name`` merge item by item (new names appended), other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            out[k] = merge(base[k], v) if k in base else copy.deepcopy(v)
        return out
    if (
        isinstance(base, list)
        and isinstance(patch, list)
        and all(isinstance(i, dict) and "name" in i for i in [*base, *patch])
    ):
        out_list = [copy.deepcopy(i) for i in base]
        for item in patch:
            found = [n for n, b in enumerate(out_list) if b["name"] == item["name"]]
            if found:
                out_list[found[0]] = merge(out_list[found[0]], item)
            else:
                out_list.append(copy.deepcopy(item))
        return out_list
    return copy.deepcopy(patch)


def containers(doc: Doc) -> list[Doc]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return list(spec.get("containers", []))


def render(directory: Path) -> list[Doc]:
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    docs: list[Doc] = []
    for entry in kust.get("resources", []) + kust.get("components", []):
        target = directory / entry
        docs.extend(render(target) if target.is_dir() else load_docs(target))
    names = [key(d) for d in docs]
    assert len(names) == len(set(names)), f"{directory}: duplicate resources {names}"
    for patch in kust.get("patches", []):
        [body] = load_docs(directory / patch["path"])
        target = patch.get("target", {})
        matches = [
            n
            for n, d in enumerate(docs)
            if d["kind"] == target.get("kind", body["kind"])
            and d["metadata"]["name"] == target.get("name", body["metadata"]["name"])
        ]
        assert matches, f"{directory}: patch {patch['path']} targets nothing the resources define"
        for n in matches:
            assert docs[n]["apiVersion"] == body["apiVersion"], f"{patch['path']}: apiVersion"
            docs[n] = merge(docs[n], body)
    for image in kust.get("images", []):
        for doc in docs:
            for c in containers(doc):
                name, _, tag = c["image"].partition(":")
                if name == image["name"] and not tag:
                    c["image"] = f"{image.get('newName', name)}:{image['newTag']}"
    for label in kust.get("labels", []):
        for doc in docs:
            doc["metadata"].setdefault("labels", {}).update(label["pairs"])
    return docs


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[Doc]]:
    return request.param, render(K8S / request.param)


# --- schemas -------------------------------------------------------------------------------------
def check_scaled_object(doc: Doc, defined: set[tuple[str, str]]) -> None:
    """KEDA's ScaledObject (keda.sh/v1alpha1), by hand: a target this kustomization defines,
    sane replica bounds, a Redis list trigger with numeric thresholds."""
    assert doc["apiVersion"] == "keda.sh/v1alpha1"
    spec = doc["spec"]
    assert set(spec) <= {
        "scaleTargetRef",
        "minReplicaCount",
        "maxReplicaCount",
        "pollingInterval",
        "cooldownPeriod",
        "idleReplicaCount",
        "fallback",
        "advanced",
        "triggers",
    }
    ref = spec["scaleTargetRef"]
    assert (ref.get("kind", "Deployment"), ref["name"]) in defined
    assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert all(isinstance(spec[k], int) and spec[k] > 0 for k in ("pollingInterval", "cooldownPeriod"))
    [trigger] = spec["triggers"]
    assert trigger["type"] == "redis"
    meta = trigger["metadata"]
    assert all(isinstance(v, str) for v in meta.values())  # KEDA's metadata is a map of strings
    assert set(meta) <= {
        "address",
        "addressFromEnv",
        "host",
        "port",
        "databaseIndex",
        "listName",
        "listLength",
        "activationListLength",
        "enableTLS",
        "usernameFromEnv",
        "passwordFromEnv",
    }
    assert int(meta["listLength"]) >= 1 and int(meta["activationListLength"]) >= 0
    assert meta["databaseIndex"].isdigit() and meta["listName"]


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_file_validates(path: Path) -> None:
    docs = load_docs(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        if doc["kind"] in CUSTOM_KINDS:
            continue  # checked rendered, against the resources it refers to
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_every_file_is_a_resource_or_a_patch() -> None:
    """No stray manifest: each file is used by a kustomization (as a resource or a patch)."""
    used = patch_files()
    for kust in K8S.rglob("kustomization.yaml"):
        for entry in yaml.safe_load(kust.read_text()).get("resources", []):
            used.add((kust.parent / entry).resolve())
    assert {p.resolve() for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml"} <= used
    assert patch_files(), "the gpu overlay patches the worker"


def test_rendered_overlays_validate(rendered: tuple[str, list[Doc]]) -> None:
    name, docs = rendered
    defined = {key(d) for d in docs}
    for doc in docs:
        if doc["kind"] in CUSTOM_KINDS:
            check_scaled_object(doc, defined)
        else:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    kinds = sorted(k for k, _ in defined)
    expected = ["ConfigMap", "ConfigMap", "Deployment", "Deployment", "Deployment"]
    expected += ["HorizontalPodAutoscaler", "PersistentVolumeClaim", "Service", "Service"]
    assert kinds == sorted(expected + (["ScaledObject"] if name.endswith("keda") else []))


def test_schemas_reject_a_broken_manifest() -> None:
    """The validation can fail: a probe port of the wrong type, an unknown field (strict)."""
    [api, _service] = load_docs(K8S / "base" / "api.yaml")
    broken = copy.deepcopy(api)
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["port"] = 8.5
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    unknown = copy.deepcopy(api)
    unknown["spec"]["replicaz"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(unknown, KUBERNETES_VERSION, strict=True)


@pytest.mark.skipif(
    not (shutil.which("kustomize") or shutil.which("kubectl")), reason="neither kustomize nor kubectl"
)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kustomize_renders_what_the_test_renders(overlay: str) -> None:
    tool = ["kustomize", "build"] if shutil.which("kustomize") else ["kubectl", "kustomize"]
    out = subprocess.run([*tool, str(K8S / overlay)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    theirs = {key(d): d for d in yaml.safe_load_all(out.stdout) if d}
    ours = {key(d): d for d in render(K8S / overlay)}
    assert theirs == ours


# --- the manifests against the code --------------------------------------------------------------
def by_key(docs: list[Doc]) -> dict[tuple[str, str], Doc]:
    return {key(d): d for d in docs}


def env_of(container: Doc, docs: list[Doc]) -> dict[str, str]:
    env: dict[str, str] = {}
    index = by_key(docs)
    for source in container.get("envFrom", []):
        env.update(index["ConfigMap", source["configMapRef"]["name"]]["data"])
    env.update({e["name"]: e["value"] for e in container.get("env", [])})
    return env


def settings_of(env: dict[str, str]) -> Settings:
    """The settings a container would start with (all its variables are known settings)."""
    fields = {name.upper() for name in Settings.model_fields}
    unknown = [k for k in env if not k.startswith("SALIENCY_") or k[len("SALIENCY_") :] not in fields]
    assert not unknown, f"variables no setting reads: {unknown}"
    return Settings(**{k[len("SALIENCY_") :].lower(): v for k, v in env.items()})


def test_containers_start_the_service_as_configured(rendered: tuple[str, list[Doc]]) -> None:
    name, docs = rendered
    index = by_key(docs)
    api = index["Deployment", "saliency-api"]
    worker = index["Deployment", "saliency-worker"]
    [api_c] = containers(api)
    [worker_c] = containers(worker)
    assert api_c["args"][0] in ENTRYPOINT_ROLES and worker_c["args"] == ["worker"]
    api_settings = settings_of(env_of(api_c, docs))
    worker_settings = settings_of(env_of(worker_c, docs))
    for s in (api_settings, worker_settings):
        assert s.jobs_backend == "celery" and s.log_format == "json"
        assert s.broker_url == "redis://saliency-redis:6379/0"
        assert s.job_visibility_timeout_s > s.job_lease_s
    # the API: probes on the routes the app serves, the port it listens on, keys from the Secret
    assert api_c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api_c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert api_c["ports"][0]["containerPort"] == api_settings.port and api_settings.host == "0.0.0.0"
    mounts = {m["name"]: m for m in api_c["volumeMounts"]}
    volumes = {v["name"]: v for v in api["spec"]["template"]["spec"]["volumes"]}
    keys_dir = mounts["api-keys"]["mountPath"]
    [item] = volumes["api-keys"]["secret"]["items"]
    assert str(api_settings.api_keys_file) == f"{keys_dir}/{item['path']}"
    assert index["Service", "saliency-api"]["spec"]["selector"] == api["spec"]["selector"]["matchLabels"]
    hpa = index["HorizontalPodAutoscaler", "saliency-api"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == "saliency-api"
    assert hpa["metrics"][0]["resource"]["name"] == "cpu" and "cpu" in api_c["resources"]["requests"]
    # the worker: probed on its metrics port, which it serves
    assert worker_c["livenessProbe"]["httpGet"]["port"] == "metrics"
    assert {p["name"]: p["containerPort"] for p in worker_c["ports"]}["metrics"] == (
        worker_settings.worker_metrics_port
    )
    # both read the same models file, which loads
    for c, d in ((api_c, api), (worker_c, worker)):
        [m] = [m for m in c["volumeMounts"] if m["name"] == "models"]
        assert m["mountPath"] == str(api_settings.models_config)
        [v] = [v for v in d["spec"]["template"]["spec"]["volumes"] if v["name"] == "models"]
        assert v["configMap"]["name"] == "saliency-models"
    if name == "base":
        assert worker_settings.device == "cpu" and "nvidia.com/gpu" not in worker_c["resources"]["limits"]
    else:  # one GPU per worker pod, and a worker takes one job at a time
        assert worker_settings.device == "cuda" and worker_c["image"].endswith(":cuda")
        assert worker_c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert api_settings.device == "cpu" and api_c["image"].endswith(":cpu")


def test_models_configmap_is_the_image_models_file(tmp_path: Path) -> None:
    [cm] = load_docs(K8S / "base" / "models.yaml")
    text = cm["data"]["models.toml"]
    assert tomllib.loads(text) == tomllib.loads((ROOT / "docker" / "models.toml").read_text())
    (tmp_path / "models.toml").write_text(text)
    assert [m.name for m in load_config(tmp_path / "models.toml")] == ["efficientnet_lite0"]


def test_keda_watches_the_celery_queue_list() -> None:
    """The Redis list KEDA measures is the one Celery's Redis transport pushes jobs to: the
    transport's key prefix, then the queue (checked against a real Redis in
    tests/integration/test_keda_queue.py)."""
    docs = render(K8S / "overlays" / "gpu-keda")
    index = by_key(docs)
    [trigger] = index["ScaledObject", "saliency-worker"]["spec"]["triggers"]
    settings = settings_of(env_of(containers(index["Deployment", "saliency-worker"])[0], docs))
    prefix = make_celery(settings).conf.broker_transport_options["global_keyprefix"]
    assert trigger["metadata"]["listName"] == prefix + queue_name(settings)
    host, port = trigger["metadata"]["address"].split(":")
    redis_service = index["Service", host]
    assert int(port) == redis_service["spec"]["ports"][0]["port"]
    assert settings.broker_url.endswith(f"{host}:{port}/{trigger['metadata']['databaseIndex']}")
