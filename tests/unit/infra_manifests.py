"""Rendering and schema validation of the Kubernetes manifests in infra/ (used by test_infra.py).

- `render_overlay` runs ``kubectl kustomize`` (offline) on a copy of infra/k8s whose Secrets
  are generated from the committed ``*.env.example`` placeholders, never from a developer's
  real ``*.env`` files.
- KubeRay kinds are checked against the CRDs copied into infra/crds, made *closed* first
  (`closed_schema`): an OpenAPI schema with ``properties`` accepts any other field unless told
  otherwise, while the API server drops or (kubectl's default field validation) rejects fields
  the CRD does not declare. A misspelled ``rayStartParams`` must fail here, as it would there.
- Built-in kinds are checked against Kubernetes' own JSON schemas, shipped for each release by
  the ``kubernetes-validate`` package, in their strict (closed) variant.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
OVERLAYS = ("dev", "prod")
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
RAY_API_VERSION = "ray.io/v1"
# The oldest Kubernetes minor version the manifests are written for (infra/README.md).
KUBERNETES_VERSION = "1.30"

# Schema keywords whose values are lists of alternative schemas. A branch must not be closed on
# its own: in a structural schema the parent declares the fields, and a closed branch would
# reject the fields the other branches (or the parent) declare.
COMBINATORS = ("allOf", "anyOf", "oneOf")

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 3 MB of YAML


class RenderError(RuntimeError):
    """kubectl kustomize failed or is missing; the message carries its stderr."""


def kubectl() -> str:
    found = shutil.which("kubectl") or ("/usr/bin/kubectl" if Path("/usr/bin/kubectl").exists() else None)
    if not found:
        raise RenderError("kubectl not found on PATH: install kubectl >= 1.27 (kustomize v5) to render infra/k8s")
    return found


def render_overlay(name: str, workdir: Path) -> list[dict]:
    """The resources ``kubectl kustomize infra/k8s/overlays/<name>`` renders, Secrets from the examples."""
    tree = workdir / "k8s"
    shutil.copytree(INFRA / "k8s", tree, ignore=shutil.ignore_patterns("*.env"))
    for example in tree.rglob("*.env.example"):
        shutil.copy(example, example.with_suffix(""))  # s3.env.example -> s3.env
    return kustomize(tree / "overlays" / name)


def kustomize(directory: Path) -> list[dict]:
    done = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RenderError(f"kubectl kustomize {directory} failed:\n{done.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


# --- KubeRay kinds: the CRD schemas, closed ---------------------------------------------------

def closed_schema(schema: dict, in_combinator: bool = False) -> dict:
    """A copy of an OpenAPI v3 schema in which every object that declares ``properties`` rejects
    any other field (``additionalProperties: false``).

    Left open: objects marked ``x-kubernetes-preserve-unknown-fields`` (the API server keeps
    unknown fields there), objects that already say what extra fields may be (maps such as
    ``rayStartParams`` or ``labels``: ``additionalProperties: {type: string}``), objects without
    ``properties`` (nothing to compare with), and the branches of allOf/anyOf/oneOf (see
    COMBINATORS). Subschemas are found only under schema keywords, so a field that happens to
    be named ``items`` or ``properties`` is treated as a field, not as a keyword.
    """
    closed: dict = {}
    for key, value in schema.items():
        if key == "properties":
            closed[key] = {field: closed_schema(sub) for field, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            closed[key] = closed_schema(value)
        elif key == "items" and isinstance(value, list):
            closed[key] = [closed_schema(sub) for sub in value]
        elif key in COMBINATORS:
            closed[key] = [closed_schema(sub, in_combinator=True) for sub in value]
        else:
            closed[key] = value
    if ("properties" in schema and "additionalProperties" not in schema and not in_combinator
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        closed["additionalProperties"] = False
    return closed


def crd_schema(crd: dict, version: str = "v1") -> dict:
    """The openAPIV3Schema of one served version of a CustomResourceDefinition."""
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            return entry["schema"]["openAPIV3Schema"]
    names = [entry["name"] for entry in crd["spec"]["versions"]]
    raise KeyError(f"{crd['metadata']['name']}: no version {version!r}, only {names}")


@functools.lru_cache(maxsize=None)
def ray_validator(kind: str) -> jsonschema.protocols.Validator:
    """A validator of the closed v1 schema of a KubeRay kind (the CRDs copied into infra/crds)."""
    if kind not in CRD_FILES:
        raise KeyError(f"no KubeRay CRD for kind {kind!r}; known: {sorted(CRD_FILES)}")
    crd = yaml.load((INFRA / "crds" / CRD_FILES[kind]).read_text(), Loader=_Loader)
    schema = closed_schema(crd_schema(crd))
    # OpenAPI 3.0 schemas are a dialect of JSON Schema draft 4 (boolean exclusiveMinimum etc.).
    return jsonschema.Draft4Validator(schema)


def validate_ray_resource(resource: dict) -> None:
    """Raise jsonschema.ValidationError, naming the path, unless the resource fits its CRD."""
    if resource.get("apiVersion") != RAY_API_VERSION:
        raise jsonschema.ValidationError(f"apiVersion {resource.get('apiVersion')!r}, expected {RAY_API_VERSION}")
    ray_validator(resource["kind"]).validate(resource)
    # The CRDs leave metadata to the API server, which checks it as for any object.
    validate_builtin({"apiVersion": "v1", "kind": "ConfigMap", "metadata": resource.get("metadata", {})})


def describe(error: jsonschema.ValidationError) -> str:
    where = "/".join(str(p) for p in error.absolute_path) or "<root>"
    return f"{where}: {error.message}"


# --- built-in kinds ---------------------------------------------------------------------------

def validate_builtin(resource: dict) -> None:
    """Raise kubernetes_validate.ValidationError unless the resource fits Kubernetes' strict schema
    (SchemaNotFoundError for a kind/apiVersion that Kubernetes does not have)."""
    kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


def is_ray(resource: dict) -> bool:
    return resource.get("apiVersion", "").startswith("ray.io/")


# --- walking the rendered objects ------------------------------------------------------------

def named(resources: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [r for r in resources if r["kind"] == kind and (name is None or r["metadata"]["name"] == name)]


def one(resources: list[dict], kind: str, name: str | None = None) -> dict:
    found = named(resources, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, rendered {len(found)}"
    return found[0]


def ray_cluster_spec(resource: dict) -> dict:
    """The RayCluster spec inside a RayJob / RayService / RayCluster."""
    spec = resource["spec"]
    return {"RayJob": lambda: spec["rayClusterSpec"], "RayService": lambda: spec["rayClusterConfig"],
            "RayCluster": lambda: spec}[resource["kind"]]()


def ray_groups(resource: dict) -> Iterator[tuple[str, dict]]:
    """(group name, group spec) for the head ("head") and each worker group."""
    cluster = ray_cluster_spec(resource)
    yield "head", cluster["headGroupSpec"]
    for group in cluster.get("workerGroupSpecs", []):
        yield group["groupName"], group


def pod_specs(resource: dict) -> Iterator[tuple[str, dict]]:
    """(where, pod spec) for every pod template in a workload or KubeRay resource."""
    kind, name = resource["kind"], resource["metadata"]["name"]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        yield f"{kind}/{name}", resource["spec"]["template"]["spec"]
    elif kind in CRD_FILES:
        for group, spec in ray_groups(resource):
            yield f"{kind}/{name} {group}", spec["template"]["spec"]


def containers(pod_spec: dict) -> list[dict]:
    return pod_spec.get("initContainers", []) + pod_spec.get("containers", [])


def quantity(value: str | int | float) -> float:
    """A Kubernetes CPU/memory/GPU quantity as a number (``500m`` -> 0.5, ``16Gi`` -> 16 * 2**30)."""
    text = str(value)
    suffixes = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
                "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    for suffix in sorted(suffixes, key=len, reverse=True):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * suffixes[suffix]
    return float(text)
