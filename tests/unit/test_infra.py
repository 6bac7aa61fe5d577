"""The deployment in infra/: each kustomize overlay renders, every object fits its schema (KubeRay
CRDs closed to unknown fields, Kubernetes' own schemas for built-in kinds), and the manifests
agree with the code they run: the RayJob's entrypoint and preset, the RayService's Serve
application and serve/config.yaml, the Ray version, the names objects refer to each other by.
Offline: kubectl kustomize renders locally; helpers in infra_manifests.py.
"""

from __future__ import annotations

import copy
import fnmatch
import re
import shlex
import tomllib
from urllib.parse import urlparse

import jsonschema
import kubernetes_validate
import pytest
import yaml

from icd.config import load_config
from infra_manifests import (CRD_FILES, INFRA, OVERLAYS, REPO, closed_schema, containers, describe, is_ray, kustomize,
                             named, one, pod_specs, quantity, ray_cluster_spec, ray_groups, render_overlay,
                             validate_builtin, validate_ray_resource)

# Importing Ray's CLI and Serve schemas warns about Ray's own pydantic-1 idioms.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")

SERVE_CONFIG = REPO / "serve" / "config.yaml"
GPU = "nvidia.com/gpu"
BUILTIN_KINDS = {"Namespace", "ConfigMap", "Secret", "Service", "Deployment", "StatefulSet"}
PLATFORM_IMAGE = "icd-platform"  # the name the base uses; each overlay maps it to a real image


@pytest.fixture(scope="module")
def renders(tmp_path_factory) -> dict[str, list[dict]]:
    return {name: render_overlay(name, tmp_path_factory.mktemp(name)) for name in OVERLAYS}


@pytest.fixture(params=OVERLAYS)
def overlay(request, renders) -> tuple[str, list[dict]]:
    return request.param, renders[request.param]


def pinned_version(package: str) -> str:
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.startswith(f"{package}=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError(f"constraints.txt pins no {package}")


def entrypoint_commands(rayjob: dict) -> list[list[str]]:
    """The entrypoint's shell commands (`a && b`), each split into words."""
    return [shlex.split(part) for part in rayjob["spec"]["entrypoint"].split("&&")]


def training_config(rayjob: dict):
    """The resolved config the RayJob trains with: its last command's --config and --set flags."""
    words = entrypoint_commands(rayjob)[-1]
    config = words[words.index("--config") + 1]
    overrides = [words[i + 1] for i, word in enumerate(words) if word == "--set"]
    return load_config(REPO / config, overrides)


def serve_config_v2(rayservice: dict) -> dict:
    return yaml.safe_load(rayservice["spec"]["serveConfigV2"])


def deployment(app: dict, name: str) -> dict:
    found = [d for d in app.get("deployments", []) if d["name"] == name]
    assert found, f"application {app['name']}: no deployment {name}"
    return found[0]


# --- schemas ----------------------------------------------------------------------------------

def test_kuberay_resources_fit_the_crds_with_unknown_fields_rejected(overlay):
    name, resources = overlay
    ray = [r for r in resources if is_ray(r)]
    assert {"RayJob", "RayService"} <= {r["kind"] for r in ray}, f"{name}: expected a RayJob and a RayService"
    failures = []
    for resource in ray:
        try:
            validate_ray_resource(resource)
        except jsonschema.ValidationError as error:
            failures.append(f"{resource['kind']}/{resource['metadata']['name']}: {describe(error)}")
    assert not failures, f"{name}:\n" + "\n".join(failures)


def test_builtin_resources_fit_the_kubernetes_schemas(overlay):
    name, resources = overlay
    builtin = [r for r in resources if not is_ray(r)]
    assert BUILTIN_KINDS <= {r["kind"] for r in builtin}, f"{name}: expected at least {sorted(BUILTIN_KINDS)}"
    failures = []
    for resource in builtin:
        try:
            validate_builtin(resource)
        except (jsonschema.ValidationError, kubernetes_validate.SchemaNotFoundError) as error:
            message = describe(error) if isinstance(error, jsonschema.ValidationError) else error.message
            failures.append(f"{resource['kind']}/{resource['metadata']['name']}: {message}")
    assert not failures, f"{name}:\n" + "\n".join(failures)


def _set(resource: dict, path: str, value) -> dict:
    """A copy of ``resource`` with ``value`` at a /-separated path (list indices as numbers)."""
    changed = copy.deepcopy(resource)
    *parents, last = path.strip("/").split("/")
    node = changed
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    node[last] = value
    return changed


RAYJOB_HEAD = "spec/rayClusterSpec/headGroupSpec"
RAYJOB_GPU = "spec/rayClusterSpec/workerGroupSpecs/1"


@pytest.mark.parametrize("kind, path, typo", [
    ("RayJob", f"{RAYJOB_HEAD}/rayStartParam", {"num-cpus": "0"}),
    ("RayJob", "spec/entrypont", "python jobs/train_icd.py"),
    ("RayJob", f"{RAYJOB_GPU}/minReplica", 0),
    ("RayJob", f"{RAYJOB_GPU}/template/spec/containers/0/imagePullPolicyy", "Always"),
    ("RayJob", f"{RAYJOB_GPU}/template/spec/tolerations/0/efect", "NoSchedule"),
    ("RayService", "spec/serveConfig", "applications: []"),
    ("RayService", "spec/rayClusterConfig/enableInTreeAutoScaling", True),
])
def test_closed_crd_schema_rejects_a_misspelled_field(renders, kind, path, typo):
    resource = one(renders["prod"], kind)
    validate_ray_resource(resource)  # the unchanged resource passes: the failure below is the typo's
    with pytest.raises(jsonschema.ValidationError, match=re.escape(path.split("/")[-1])):
        validate_ray_resource(_set(resource, path, typo))


@pytest.mark.parametrize("path, value", [
    (f"{RAYJOB_HEAD}/rayStartParams/metrics-export-port", "8080"),            # a map: any key
    (f"{RAYJOB_GPU}/template/metadata", {"labels": {"team": "ml"}}),           # declared metadata
    (f"{RAYJOB_GPU}/template/spec/containers/0/resources/limits/cpu", 12),     # int-or-string
])
def test_closed_crd_schema_still_accepts_what_the_crd_allows(renders, path, value):
    validate_ray_resource(_set(one(renders["prod"], "RayJob"), path, value))


@pytest.mark.parametrize("path, value", [
    (f"{RAYJOB_GPU}/template/spec/containers/0/resources/limits/cpu", "ten"),  # not a quantity
    (f"{RAYJOB_GPU}/minReplicas", "0"),                                        # not an integer
    ("metadata/lables", {"a": "b"}),                                           # ObjectMeta typo
])
def test_crd_schema_rejects_wrong_values(renders, path, value):
    with pytest.raises(jsonschema.ValidationError):
        validate_ray_resource(_set(one(renders["prod"], "RayJob"), path, value))


def test_closed_schema_closes_declared_objects_only():
    schema = closed_schema({"type": "object", "properties": {
        "spec": {"type": "object", "properties": {"items": {"type": "string"}}},           # a field named items
        "params": {"type": "object", "additionalProperties": {"type": "string"}},           # a map
        "raw": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                "properties": {"known": {"type": "string"}}},
        "list": {"type": "array", "items": {"type": "object", "properties": {"a": {"type": "string"}}}},
        "port": {"anyOf": [{"type": "integer"}, {"type": "object", "properties": {"n": {"type": "integer"}}}]},
    }})
    validator = jsonschema.Draft4Validator(schema)
    good = {"spec": {"items": "x"}, "params": {"any-key": "v"}, "raw": {"known": "k", "extra": 1},
            "list": [{"a": "b"}], "port": {"n": 1, "other": 2}}
    assert not list(validator.iter_errors(good))
    for bad in ({"spek": {}}, {"spec": {"item": "x"}}, {"list": [{"a": "b", "b": "c"}]}, {"params": {"k": 1}}):
        assert list(validator.iter_errors(bad)), f"accepted {bad}"


@pytest.mark.parametrize("kind, path, typo", [
    ("Deployment", "spec/replica", 1),
    ("Deployment", "spec/template/spec/containers/0/comand", ["mlflow"]),
    ("StatefulSet", "spec/volumeClaimTemplates/0/spec/accesModes", ["ReadWriteOnce"]),
    ("Service", "spec/ports/0/targetport", 5000),
    ("ConfigMap", "dat", {}),
])
def test_kubernetes_schema_rejects_a_misspelled_field(renders, kind, path, typo):
    resource = named(renders["prod"], kind)[0]
    validate_builtin(resource)
    with pytest.raises(kubernetes_validate.ValidationError, match=re.escape(path.split("/")[-1])):
        validate_builtin(_set(resource, path, typo))


# --- the RayJob -----------------------------------------------------------------------------------

def test_rayjob_entrypoint_runs_files_and_a_config_that_exist(overlay):
    name, resources = overlay
    rayjob = one(resources, "RayJob")
    for words in entrypoint_commands(rayjob):
        assert words[0] == "python", f"{name}: entrypoint command {shlex.join(words)!r} is not a python script"
        script = REPO / words[1]
        assert script.is_file(), f"{name}: entrypoint runs {words[1]}, which does not exist"
        if "--config" in words:
            assert (REPO / words[words.index("--config") + 1]).is_file()
    assert entrypoint_commands(rayjob)[-1][1] == "jobs/train_icd.py", f"{name}: the entrypoint must end with the DAG"
    training_config(rayjob)  # the preset and every --set override are valid (ConfigError otherwise)


def test_prod_trains_the_sd15_preset_on_gpus(renders):
    rayjob = one(renders["prod"], "RayJob")
    assert rayjob["spec"]["entrypoint"] == "python jobs/train_icd.py --config jobs/configs/sd15.yaml"
    config = training_config(rayjob)
    assert config.preset == "sd15" and config.scaling.use_gpu
    cluster = ray_cluster_spec(rayjob)
    assert cluster["enableInTreeAutoscaling"] is True
    groups = dict(ray_groups(rayjob))
    assert GPU not in str(groups["head"]), "the head must be CPU-only"
    assert groups["head"]["rayStartParams"].get("num-cpus") == "0", "the head must not run tasks"
    cpu_groups = [g for name, g in groups.items() if name != "head" and GPU not in str(g)]
    assert cpu_groups, "expected a CPU worker group for Ray Data preprocessing"
    gpu_groups = [g for g in groups.values() if GPU in str(g)]
    assert len(gpu_groups) == 1, "expected one GPU worker group"
    gpu = gpu_groups[0]
    assert gpu["minReplicas"] == 0, "the GPU group must scale to zero between runs"
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    # A Ray Train worker asks for {CPU: cpus_per_worker, GPU: gpus_per_worker}: one must fit a pod,
    # and the group must be able to grow to all of them, or the autoscaler waits forever.
    assert quantity(limits[GPU]) >= config.scaling.gpus_per_worker
    assert quantity(limits["cpu"]) >= config.scaling.cpus_per_worker
    workers_per_pod = quantity(limits[GPU]) // config.scaling.gpus_per_worker
    assert gpu["maxReplicas"] * workers_per_pod >= config.scaling.num_workers


def test_dev_is_cpu_only_and_fits_its_workers(renders):
    resources = renders["dev"]
    assert GPU not in yaml.safe_dump_all(resources), "the dev overlay must request no GPU"
    rayjob = one(resources, "RayJob")
    config = training_config(rayjob)
    assert config.preset == "toy" and config.scaling.use_gpu is False
    workers = [g for name, g in ray_groups(rayjob) if name != "head"]
    cpus = sum(quantity(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]) * g["maxReplicas"]
               for g in workers)
    assert cpus >= config.scaling.num_workers * config.scaling.cpus_per_worker
    editor = deployment(serve_config_v2(one(resources, "RayService"))["applications"][0], "Editor")
    assert not editor.get("ray_actor_options", {}).get("num_gpus")
    assert editor["autoscaling_config"]["max_replicas"] == 1


def test_ray_start_params_are_options_of_ray_start(overlay):
    """rayStartParams is a free-form map to the CRD; KubeRay passes each entry as --key=value."""
    from ray.scripts.scripts import start

    name, resources = overlay
    options = {flag.lstrip("-") for param in start.params for flag in param.opts}
    for resource in (r for r in resources if is_ray(r)):
        for group, spec in ray_groups(resource):
            unknown = set(spec.get("rayStartParams", {})) - options
            assert not unknown, f"{name}: {resource['kind']} {group}: {sorted(unknown)} are not options of ray start"


def test_ray_version_is_the_pinned_one(overlay):
    name, resources = overlay
    for resource in (r for r in resources if is_ray(r)):
        assert ray_cluster_spec(resource)["rayVersion"] == pinned_version("ray"), (
            f"{name}: {resource['kind']} rayVersion differs from constraints.txt")


# --- the RayService -------------------------------------------------------------------------------

def test_serve_config_v2_is_the_application_of_serve_config_yaml(overlay):
    from ray.serve.schema import ServeDeploySchema

    name, resources = overlay
    embedded = serve_config_v2(one(resources, "RayService"))
    ServeDeploySchema.model_validate(embedded)  # raises a pydantic ValidationError naming the field
    local = yaml.safe_load(SERVE_CONFIG.read_text())

    def shape(config: dict) -> dict:
        return {app["name"]: (app["import_path"], app.get("route_prefix"), sorted(d["name"] for d in app["deployments"]))
                for app in config["applications"]}

    assert shape(embedded) == shape(local), f"{name}: serveConfigV2 is not the application of serve/config.yaml"
    for app in embedded["applications"]:
        module = app["import_path"].split(":")[0]
        assert (REPO / (module.replace(".", "/") + ".py")).is_file(), f"{name}: no module for {app['import_path']}"
    # Serve listens beyond the pod: the Kubernetes Service reaches the proxies on the pod IPs.
    assert embedded["http_options"]["host"] == "0.0.0.0"


def test_served_model_is_the_one_the_rayjob_registers(overlay):
    name, resources = overlay
    config = training_config(one(resources, "RayJob"))
    expected = f"models:/{config.tracking.model_name(config.preset)}@champion"
    app = serve_config_v2(one(resources, "RayService"))["applications"][0]
    assert app["args"]["model_uri"] == expected, f"{name}: serves {app['args']['model_uri']}, trains {expected}"
    assert deployment(app, "Editor")["user_config"]["model_uri"] == expected


def test_prod_serves_from_autoscaled_gpu_replicas(renders):
    rayservice = one(renders["prod"], "RayService")
    editor = deployment(serve_config_v2(rayservice)["applications"][0], "Editor")
    assert editor["ray_actor_options"]["num_gpus"] == 1
    # A replica can only fill a batch if it may hold that many requests at once.
    assert editor["max_ongoing_requests"] >= editor["user_config"].get("max_batch_size", 1)
    scaling = editor["autoscaling_config"]
    assert 1 <= scaling["min_replicas"] < scaling["max_replicas"]
    gpu_groups = [g for _, g in ray_groups(rayservice) if GPU in str(g)]
    assert len(gpu_groups) == 1, "expected one GPU worker group for the Editor replicas"
    limits = gpu_groups[0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert quantity(limits[GPU]) >= 1 and quantity(limits["cpu"]) >= editor["ray_actor_options"]["num_cpus"]
    assert gpu_groups[0]["maxReplicas"] * quantity(limits[GPU]) >= scaling["max_replicas"]
    assert ray_cluster_spec(rayservice)["enableInTreeAutoscaling"] is True
    assert rayservice["spec"]["upgradeStrategy"]["type"] == "NewCluster"  # zero-downtime cluster upgrades


def test_only_the_rayservice_is_labelled_serving(overlay):
    """infra/README.md applies everything but `component=serving` first (Serve needs a champion)."""
    name, resources = overlay
    serving = [f"{r['kind']}/{r['metadata']['name']}" for r in resources
               if r["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "serving"]
    assert serving == ["RayService/icd-serve"], f"{name}: labelled serving: {serving}"


# --- references between objects --------------------------------------------------------------------

def _data_keys(resource: dict) -> set[str]:
    return set(resource.get("data", {})) | set(resource.get("stringData", {}))


def test_every_reference_names_an_object_and_key_that_exist(overlay):
    name, resources = overlay
    objects = {(r["kind"], r["metadata"]["name"]): r for r in resources}
    claims = {f"{t['metadata']['name']}" for s in named(resources, "StatefulSet")
              for t in s["spec"].get("volumeClaimTemplates", [])}
    missing = []

    def need(kind: str, ref: dict, where: str, key: str | None = None) -> None:
        target = objects.get((kind, ref["name"]))
        if target is None:
            missing.append(f"{where}: {kind} {ref['name']} is not rendered")
        elif key is not None and key not in _data_keys(target) and not ref.get("optional"):
            missing.append(f"{where}: {kind} {ref['name']} has no key {key}")

    for resource in resources:
        for where, pod in pod_specs(resource):
            for container in containers(pod):
                for source in container.get("envFrom", []):
                    if "configMapRef" in source:
                        need("ConfigMap", source["configMapRef"], where)
                    if "secretRef" in source:
                        need("Secret", source["secretRef"], where)
                for variable in container.get("env", []):
                    ref = variable.get("valueFrom", {})
                    if "configMapKeyRef" in ref:
                        need("ConfigMap", ref["configMapKeyRef"], where, ref["configMapKeyRef"]["key"])
                    if "secretKeyRef" in ref:
                        need("Secret", ref["secretKeyRef"], where, ref["secretKeyRef"]["key"])
                for mount in container.get("volumeMounts", []):
                    declared = {v["name"] for v in pod.get("volumes", [])} | claims
                    if mount["name"] not in declared:
                        missing.append(f"{where}: volumeMount {mount['name']} has no volume")
    assert not missing, f"{name}:\n" + "\n".join(missing)


def test_every_service_selects_a_pod_template(overlay):
    name, resources = overlay
    templates = [r["spec"]["template"]["metadata"].get("labels", {}) for r in resources
                 if r["kind"] in ("Deployment", "StatefulSet")]
    for service in named(resources, "Service"):
        selector = service["spec"]["selector"]
        assert any(selector.items() <= labels.items() for labels in templates), (
            f"{name}: Service {service['metadata']['name']} selects no pods ({selector})")


def test_mlflow_server_uses_postgres_and_s3_and_answers_its_clients(overlay):
    name, resources = overlay
    env = one(resources, "ConfigMap", "icd-env")["data"]
    mlflow = one(resources, "Deployment", "icd-mlflow")
    container = mlflow["spec"]["template"]["spec"]["containers"][0]
    args = dict(arg.removeprefix("--").split("=", 1) if "=" in arg else (arg.removeprefix("--"), "")
                for arg in container["args"])
    assert args["backend-store-uri"].startswith("postgresql://")
    assert args["artifacts-destination"] == "s3://$(ICD_BUCKET)/mlflow"
    assert "serve-artifacts" in args
    # Kubernetes leaves $(VAR) as it is when VAR is not in the container's env list.
    defined = {variable["name"] for variable in container.get("env", [])}
    for variable in re.findall(r"\$\((\w+)\)", " ".join(container["args"])):
        assert variable in defined, f"{name}: MLflow args use $({variable}), not in the container's env"
    # The tracking URI every pod uses names the MLflow Service and port, and MLflow accepts that Host.
    uri = urlparse(env["MLFLOW_TRACKING_URI"])
    service = one(resources, "Service", uri.hostname)
    assert uri.port in {p["port"] for p in service["spec"]["ports"]}
    assert service["spec"]["selector"].items() <= mlflow["spec"]["template"]["metadata"]["labels"].items()
    allowed = args["allowed-hosts"].split(",")
    assert any(fnmatch.fnmatch(uri.netloc, pattern) for pattern in allowed), f"{name}: MLflow rejects Host {uri.netloc}"
    database = one(resources, "Service", env["MLFLOW_DB_HOST"])
    assert 5432 in {p["port"] for p in database["spec"]["ports"]}


def test_platform_containers_run_the_overlay_image(overlay):
    name, resources = overlay
    platform = [r for r in resources if is_ray(r) or r["kind"] == "Deployment"]  # not the database
    images = {container["image"] for resource in platform for _, pod in pod_specs(resource)
              for container in containers(pod)}
    assert len(images) == 1, f"{name}: Ray and MLflow pods must run one image, found {sorted(images)}"
    image = images.pop()
    assert ":" in image.rsplit("/", 1)[-1], f"{name}: image {image} has no tag (the overlay's images: entry)"
    if name == "prod":
        assert "/" in image and PLATFORM_IMAGE in image, f"prod: image {image} is not a registry's icd-platform"


# --- secrets, image, package ------------------------------------------------------------------------

def test_secrets_come_only_from_ignored_env_files_with_placeholders():
    assert not [r for r in kustomize(INFRA / "k8s" / "base") if r["kind"] == "Secret"], "base must hold no Secret"
    examples = sorted((INFRA / "k8s").rglob("*.env.example"))
    assert examples
    for example in examples:
        for line in example.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                key, _, value = line.partition("=")
                assert value in ("", "change-me", "mlflow"), f"{example}: {key} holds a value, not a placeholder"
        ignore = example.parent / ".gitignore"
        assert ignore.is_file() and "*.env" in ignore.read_text().split(), f"{example.parent}: *.env not git-ignored"


def test_image_is_built_from_the_pinned_ray_and_python():
    dockerfile = (INFRA / "image" / "Dockerfile").read_text()
    base = re.search(r"^ARG RAY_IMAGE=(\S+)$", dockerfile, re.M)
    assert base and re.search(r"^FROM \$\{RAY_IMAGE\}$", dockerfile, re.M), "expected ARG RAY_IMAGE + FROM ${RAY_IMAGE}"
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    python = re.search(r">=\s*3\.(\d+)", requires).group(1)
    assert base.group(1) == f"rayproject/ray:{pinned_version('ray')}-py3{python}-gpu"
    for source in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", dockerfile, re.M):
        for path in source.split():
            assert (REPO / path).exists(), f"the Dockerfile copies {path}, which does not exist"
    ignore = (INFRA / "image" / "Dockerfile.dockerignore").read_text().split()
    for needed in ("jobs", "serve", "platform", "pyproject.toml", "constraints.txt"):
        assert f"!{needed}" in ignore, f"Dockerfile.dockerignore keeps {needed} out of the build context"


def test_non_editable_install_ships_the_package_data():
    """The image installs the package non-editable: every non-Python file under platform/icd (the
    toy base model) must be covered by pyproject.toml's package-data, or the image lacks it."""
    package = REPO / "platform" / "icd"
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["icd"]
    shipped = {path for pattern in patterns for path in package.glob(pattern) if path.is_file()}
    data = {path for path in package.rglob("*") if path.is_file() and path.suffix not in (".py", ".pyc")
            and "__pycache__" not in path.parts}
    unshipped = sorted(str(path.relative_to(package)) for path in data - shipped)
    assert not unshipped, f"not in [tool.setuptools.package-data] icd: {unshipped[:5]} ({len(unshipped)} files)"


def test_crd_copies_carry_their_license():
    assert (INFRA / "crds" / "LICENSE").read_text().lstrip().startswith("Apache License")
    for kind, filename in CRD_FILES.items():
        head = (INFRA / "crds" / filename).read_text()[:2000]
        assert "kind: CustomResourceDefinition" in head and f"kind: {kind}" in head, f"{filename} is not the {kind} CRD"
