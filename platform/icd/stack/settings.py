"""Settings of the local stack, read from ``ICD_*`` environment variables and ``.env``.

Every port the stack opens is set here, so two stacks (a developer's and the test suite's)
can run side by side. Credentials have no default: ``icd stack init-env`` writes a ``.env``
with fresh random ones.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import secrets
import tempfile
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class StackError(RuntimeError):
    """The stack cannot start or stop; the message is one line naming the cause and the fix."""


class StackSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ICD_", env_file=".env", extra="ignore")

    state_dir: Path = Field(Path(".icd"), description="logs, PIDs, S3 data, MLflow database")
    host: str = Field("127.0.0.1", description="interface every service binds to")
    bucket: str = "icd"
    region: str = "us-east-1"
    s3_access_key: SecretStr | None = None
    s3_secret_key: SecretStr | None = None

    s3_port: int = Field(8333, ge=1024, le=65535)
    # SeaweedFS's master, volume, filer and admin servers and their gRPC ports take 8
    # consecutive ports from here; its admin gRPC port is the admin port + 10000.
    s3_internal_port_base: int = Field(9330, ge=1024, le=55527)
    mlflow_port: int = Field(5000, ge=1024, le=65535)
    ray_port: int = Field(6379, ge=1024, le=65535)
    ray_dashboard_port: int = Field(8265, ge=1024, le=65535)
    ray_client_port: int = Field(10001, ge=1024, le=65535)
    # Ray's dashboard agent (HTTP + gRPC), runtime-env agent, metrics, node manager and
    # object manager take 6 consecutive ports from here.
    ray_internal_port_base: int = Field(20000, ge=1024, le=65530)
    serve_port: int = Field(8000, ge=1024, le=65535)

    ray_num_cpus: int | None = Field(None, ge=1, description="CPUs for jobs; default: all cores")
    # The head advertises this many logical CPUs more than ray_num_cpus: room for the served
    # editor (serve/config.yaml's replicas hold 0.25 + 0.75), so `icd serve up` does not take
    # the CPUs a training job schedules on. The replicas idle between requests; when both run,
    # they share the cores as any two processes do.
    serve_cpus: int = Field(1, ge=0, description="logical CPUs added for the Serve app")
    ray_object_store_mb: int = Field(1024, ge=75, description="caps Ray's shared-memory object store")
    health_timeout_s: float = Field(180.0, gt=0)

    @field_validator("state_dir")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return v.expanduser().resolve()

    @field_validator("host")
    @classmethod
    def _ip(cls, v: str) -> str:
        try:
            ipaddress.ip_address(v)
        except ValueError:
            raise ValueError(f"expected an IP address such as 127.0.0.1, got {v!r}") from None
        return v

    # --- derived ---------------------------------------------------------------------

    @property
    def loopback_only(self) -> bool:
        return ipaddress.ip_address(self.host).is_loopback

    @property
    def s3_endpoint(self) -> str:
        return f"http://{self.host}:{self.s3_port}"

    @property
    def mlflow_uri(self) -> str:
        return f"http://{self.host}:{self.mlflow_port}"

    @property
    def ray_dashboard_url(self) -> str:
        return f"http://{self.host}:{self.ray_dashboard_port}"

    @property
    def head_logical_cpus(self) -> int:
        return (self.ray_num_cpus or os.cpu_count() or 1) + self.serve_cpus

    @property
    def ray_gcs_address(self) -> str:
        return f"{self.host}:{self.ray_port}"

    @property
    def serve_url(self) -> str:
        return f"http://{self.host}:{self.serve_port}"

    @property
    def ray_auth_token_path(self) -> Path:
        return self.state_dir / "ray" / "auth_token"

    @property
    def stack_id(self) -> str:
        """Identifies this stack's processes (one stack per state dir)."""
        return hashlib.sha1(str(self.state_dir).encode()).hexdigest()[:10]

    @property
    def ray_temp_dir(self) -> Path:
        # Ray puts Unix sockets under its temp dir and a socket path may not exceed 107
        # bytes, so the session lives under a short /tmp path tied to this state dir.
        return Path(tempfile.gettempdir()) / f"icd-ray-{self.stack_id}"

    def weed_ports(self) -> dict[str, int]:
        base = self.s3_internal_port_base
        return {
            "master.port": base, "master.port.grpc": base + 1,
            "volume.port": base + 2, "volume.port.grpc": base + 3,
            "filer.port": base + 4, "filer.port.grpc": base + 5,
            "s3.port.grpc": base + 6, "admin.port": base + 7,
        }

    def ray_internal_ports(self) -> dict[str, int]:
        base = self.ray_internal_port_base
        names = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                 "metrics-export-port", "node-manager-port", "object-manager-port")
        return {name: base + i for i, name in enumerate(names)}

    def credentials(self) -> tuple[str, str]:
        """The S3 access key and secret, or a `StackError` saying how to set them."""
        missing = [name for name, value in (("ICD_S3_ACCESS_KEY", self.s3_access_key),
                                            ("ICD_S3_SECRET_KEY", self.s3_secret_key))
                   if value is None or not value.get_secret_value()]
        if missing:
            raise StackError(
                f"{' and '.join(missing)} not set: run `icd stack init-env` to write a .env "
                "with fresh credentials, or export them"
            )
        return self.s3_access_key.get_secret_value(), self.s3_secret_key.get_secret_value()

    def client_env(self) -> dict[str, str]:
        """What a client of the stack needs: Ray (every tool), MLflow, S3.

        Ray's tools read different variables: ``ray.init()`` and ``ray status`` a GCS address in
        RAY_ADDRESS; the jobs CLI and SDK RAY_API_SERVER_ADDRESS before RAY_ADDRESS; Serve's CLI
        RAY_DASHBOARD_ADDRESS. Each gets the address it understands.
        """
        access_key, secret_key = self.credentials()
        # A loopback-only head: without this a client swaps 127.0.0.1 for the machine's routable IP
        # (ray._private.services.resolve_ip_for_localhost), where nothing listens.
        loopback = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"} if self.loopback_only else {}
        return {
            **loopback,
            "RAY_ADDRESS": self.ray_gcs_address,
            "RAY_API_SERVER_ADDRESS": self.ray_dashboard_url,
            "RAY_DASHBOARD_ADDRESS": self.ray_dashboard_url,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.ray_auth_token_path),
            "MLFLOW_TRACKING_URI": self.mlflow_uri,
            "AWS_ACCESS_KEY_ID": access_key,
            "AWS_SECRET_ACCESS_KEY": secret_key,
            "AWS_ENDPOINT_URL": self.s3_endpoint,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
            "ICD_BUCKET": self.bucket,
            "ICD_SERVE_URL": self.serve_url,
        }


def new_env_file_text() -> str:
    """Contents of a fresh ``.env``: random credentials and the default ports, commented."""
    access = "icd" + secrets.token_hex(8)
    secret = secrets.token_urlsafe(30)
    defaults = StackSettings.model_fields
    lines = [
        "# Local stack settings (icd stack up reads this file). Never commit it.",
        f"ICD_S3_ACCESS_KEY={access}",
        f"ICD_S3_SECRET_KEY={secret}",
        "# Uncomment to change where state lives or which ports are used:",
    ]
    for name in ("state_dir", "host", "bucket", "s3_port", "s3_internal_port_base", "mlflow_port",
                 "ray_port", "ray_dashboard_port", "ray_client_port", "ray_internal_port_base",
                 "serve_port", "ray_object_store_mb", "serve_cpus"):
        lines.append(f"# ICD_{name.upper()}={defaults[name].default}")
    return "\n".join(lines) + "\n"
