"""``icd serve up|down|status``: the Serve application of ``serve/config.yaml`` on the stack's Ray head.

``up`` zips the ``serve`` package (content-addressed, deterministic), uploads it to
``s3://<bucket>/serve/code/<sha>.zip`` and deploys the config with ``serve deploy`` with that
zip as the application's ``working_dir`` — the way a cluster fetches code it does not have
on disk. The registry alias in ``user_config.model_uri`` is resolved to a version here and
written as ``user_config.model_version``: running ``up`` again after the alias moved changes
only the ``user_config``, so Serve calls ``Editor.reconfigure`` on the live replicas (no
restart, requests in flight finish); if nothing moved, nothing changes.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import requests
import yaml

from icd.stack.settings import StackError, StackSettings

REPO = Path(__file__).resolve().parents[3]
DEFAULT_CONFIG = REPO / "serve" / "config.yaml"
APP_PACKAGE = "serve"
# Zip members get this fixed timestamp so the same code always gives the same hash.
ZIP_EPOCH = (2020, 1, 1, 0, 0, 0)


def package_app(source: Path = REPO / APP_PACKAGE) -> bytes:
    """A zip of the ``serve`` package under one top-level directory (what Ray's remote ``working_dir`` expects)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(source.rglob("*")):
            if path.is_dir() or "__pycache__" in path.parts or path.suffix == ".pyc":
                continue
            info = zipfile.ZipInfo(f"icd-serve/{APP_PACKAGE}/{path.relative_to(source).as_posix()}", ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, path.read_bytes())
    return buffer.getvalue()


def upload_app(settings: StackSettings, blob: bytes) -> str:
    """Put the code zip in the stack's bucket (once per content) and return its ``s3://`` URI."""
    from icd.storage import S3Settings, s3_client

    key = f"serve/code/{hashlib.sha256(blob).hexdigest()[:20]}.zip"
    access_key, secret_key = settings.credentials()
    s3 = s3_client(S3Settings(endpoint_url=settings.s3_endpoint, access_key=access_key, secret_key=secret_key,
                              region=settings.region, bucket=settings.bucket))
    s3.put_object(Bucket=settings.bucket, Key=key, Body=blob)
    return f"s3://{settings.bucket}/{key}"


def resolve_alias(model_uri: str) -> str | None:
    """The registry version ``models:/<name>@<alias>`` names now (None for other URIs)."""
    if not model_uri.startswith("models:/") or "@" not in model_uri:
        return None
    import mlflow

    name, _, alias = model_uri.removeprefix("models:/").partition("@")
    try:
        return str(mlflow.MlflowClient().get_model_version_by_alias(name, alias).version)
    except mlflow.exceptions.MlflowException as exc:
        raise StackError(f"user_config.model_uri {model_uri!r}: no such registered model or alias "
                         f"(train and promote first: jobs/train_icd.py, jobs/promote.py): {exc}") from None


def check_servable(model_uri: str, version: str) -> None:
    """Refuse a registry version whose model cannot be read, before anything is deployed.

    Deploying it would not only fail: Serve stops a replica whose reconfigure fails, so the
    running model would go down with it.
    """
    import mlflow

    name = model_uri.removeprefix("models:/").partition("@")[0]
    try:
        mlflow.models.get_model_info(f"models:/{name}/{version}")
    except Exception as exc:
        raise StackError(f"cannot serve {model_uri} = {name} version {version}: its model cannot be read "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]}). Nothing was deployed; a running "
                         "application keeps its model. Point the alias at a good version and run this again.") from None


def pinned_versions(config: dict) -> list[tuple[str, str]]:
    """(model_uri, model_version) of every deployment whose user_config pins a registry version."""
    return [(d["user_config"]["model_uri"], d["user_config"]["model_version"])
            for app in config["applications"] for d in app.get("deployments", [])
            if (d.get("user_config") or {}).get("model_version")]


def deploy_config(config: dict, settings: StackSettings, working_dir: str, model_uri: str | None = None) -> dict:
    """``config`` for this stack: its HTTP port, the uploaded code, the Editor pinned to a registry version."""
    config = copy.deepcopy(config)
    config["http_options"] = {**config.get("http_options", {}), "host": settings.host, "port": settings.serve_port}
    for app in config["applications"]:
        app["runtime_env"] = {**app.get("runtime_env", {}), "working_dir": working_dir}
        for deployment in app.get("deployments", []):
            user_config = deployment.get("user_config")
            if user_config is None or "model_uri" not in user_config:
                continue
            if model_uri:
                user_config["model_uri"] = model_uri
                app.setdefault("args", {})["model_uri"] = model_uri
            version = resolve_alias(user_config["model_uri"])
            if version:
                user_config["model_version"] = version
    return config


def _serve_cli(settings: StackSettings, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    serve = Path(sys.executable).with_name("serve")
    env = {**os.environ, **settings.client_env()}
    done = subprocess.run([str(serve), *args, "--address", settings.ray_dashboard_url], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise StackError(f"serve {args[0]} failed: {(done.stderr or done.stdout).strip()[-1500:]}")
    return done


def status(settings: StackSettings) -> dict:
    """``serve status`` as a dict (applications and their deployments' states)."""
    return yaml.safe_load(_serve_cli(settings, "status").stdout) or {}


def wait_healthy(settings: StackSettings, timeout_s: float = 300) -> dict:
    """Wait until the application is RUNNING and ``/healthz`` answers; return ``/v1/models``."""
    deadline, last = time.monotonic() + timeout_s, "no answer"
    while time.monotonic() < deadline:
        apps = status(settings).get("applications", {})
        app = apps.get("icd", {})
        if app.get("status") == "DEPLOY_FAILED":
            raise StackError(f"the Serve application failed to deploy: {app.get('message', '')[-1500:]}")
        try:
            health = requests.get(f"{settings.serve_url}/healthz", timeout=5)
            if app.get("status") == "RUNNING" and health.ok:
                return requests.get(f"{settings.serve_url}/v1/models", timeout=10).json()
            last = f"{app.get('status', 'not deployed')}; /healthz {health.status_code}"
        except requests.RequestException as exc:
            last = f"{app.get('status', 'not deployed')}; {type(exc).__name__}"
        time.sleep(2)
    raise StackError(f"the Serve application is not healthy after {timeout_s:.0f} s ({last}); "
                     f"see `serve status` and {settings.ray_temp_dir}/session_latest/logs/serve/")


def up(settings: StackSettings, config_path: Path = DEFAULT_CONFIG, model_uri: str | None = None,
       wait: bool = True) -> dict:
    """Deploy (or update in place) the Serve application on the stack; return what it serves."""
    if not config_path.exists():
        raise StackError(f"serve config {config_path} not found")
    os.environ.update({k: v for k, v in settings.client_env().items() if k.startswith(("MLFLOW", "AWS"))})
    config = deploy_config(yaml.safe_load(config_path.read_text()), settings, upload_app(settings, package_app()),
                           model_uri)
    for uri, version in pinned_versions(config):
        check_servable(uri, version)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        yaml.safe_dump(config, handle, sort_keys=False)
    try:
        _serve_cli(settings, "deploy", handle.name)
    finally:
        Path(handle.name).unlink(missing_ok=True)
    info = wait_healthy(settings) if wait else {}
    if info.get("refused_update"):  # the version's files were there but it did not load in the replica
        raise StackError(f"{info['refused_update']}. The deployment now names that version: point the alias at a "
                         "good version and run this again before a replica restarts.")
    return {"url": settings.serve_url, "docs": f"{settings.serve_url}/docs", **info}


def down(settings: StackSettings) -> None:
    """Delete every Serve application on the stack (the Ray head keeps running)."""
    _serve_cli(settings, "shutdown", "-y")


def describe(info: dict) -> str:
    return json.dumps(info, indent=2, sort_keys=True)
