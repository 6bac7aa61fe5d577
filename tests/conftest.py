"""Shared fixtures. The local stack is started once per test session, on its own ports and
in its own state directory, so it never touches a developer's stack (ports from
$ICD_TEST_PORT_BASE, default 31000)."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from icd.stack import StackSettings, down, up

PORT_BASE = int(os.environ.get("ICD_TEST_PORT_BASE", "31000"))


def _settings(state_dir: Path, base: int = PORT_BASE, **overrides) -> StackSettings:
    values = dict(
        state_dir=state_dir,
        host="127.0.0.1",
        bucket="icd-test",
        s3_access_key="testkey" + secrets.token_hex(4),
        s3_secret_key=secrets.token_urlsafe(24),
        s3_port=base, mlflow_port=base + 1, ray_port=base + 2, ray_dashboard_port=base + 3,
        ray_client_port=base + 4, serve_port=base + 5,
        s3_internal_port_base=base + 10, ray_internal_port_base=base + 20,
        ray_num_cpus=2, ray_object_store_mb=512,
    )
    values.update(overrides)
    return StackSettings(_env_file=None, **values)


@pytest.fixture
def make_stack_settings():
    """``make_stack_settings(state_dir, base=..., **fields)``: settings on test ports, no .env."""
    return _settings


@pytest.fixture(scope="session")
def stack() -> StackSettings:
    """A running stack (S3 + MLflow + Ray head) for the whole session, from an empty state dir.

    The state dir is fixed per port base, so a test run that was killed before its teardown
    leaves processes this one can find and stop by their records.
    """
    import shutil
    import tempfile

    state_dir = Path(tempfile.gettempdir()) / f"icd-test-stack-{PORT_BASE}"
    down(_settings(state_dir), say=lambda msg: None)
    shutil.rmtree(state_dir, ignore_errors=True)
    settings = _settings(state_dir)
    up(settings, say=lambda msg: None)
    yield settings
    down(settings, say=lambda msg: None)


@pytest.fixture(scope="session")
def local_ray(stack):
    """One in-process Ray for the whole session (Ray Data and ``serve.run`` tests), apart from the
    stack's head, object store capped. Its workers inherit the stack's S3 and MLflow settings.

    Started once, never restarted: Ray shut down and started again in one process leaves
    background threads pointing at a freed core worker, and the interpreter crashed at exit
    (a segmentation fault after every test had passed; ray-project/ray#31145).
    """
    import ray

    saved = dict(os.environ)
    os.environ.update({k: v for k, v in stack.client_env().items() if not k.startswith("RAY_")})
    try:
        ray.init(address="local", num_cpus=2, object_store_memory=300 * 1024 * 1024, include_dashboard=False,
                 log_to_driver=False)
    finally:  # the workers got the settings from the raylet; this process keeps its own environment
        os.environ.clear()
        os.environ.update(saved)
    yield
    ray.shutdown()


@pytest.fixture
def stack_env(stack, monkeypatch) -> StackSettings:
    """The running stack, with this process's environment pointed at it as a client's would be."""
    for key, value in stack.client_env().items():
        monkeypatch.setenv(key, value)
    return stack


def pytest_collection_modifyitems(items):
    """Mark each test with its tier (the folder it lives in): unit, integration or e2e."""
    for item in items:
        tier = Path(str(item.fspath)).parent.name
        if tier in ("unit", "integration", "e2e"):
            item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session")
def released_checkpoints(tmp_path_factory):
    """The official iCD files for the three released boundary sets, at reduced width (tests/release_checkpoints.py)."""
    from release_checkpoints import build_released_checkpoints

    return build_released_checkpoints(tmp_path_factory.mktemp("released"))
