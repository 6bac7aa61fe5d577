"""The local stack with real servers: SeaweedFS S3, MLflow, a Ray head. No mocks."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import mlflow
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
from botocore.exceptions import ClientError

from icd import stack as stack_api
from icd.stack.processes import STACK_ID_VAR, ProcessRecord
from icd.stack.services import SERVICES
from icd.storage import S3Settings, StorageError, check_access, s3_client, s3_filesystem

REPO = Path(__file__).resolve().parents[2]
TWENTY_MB = 20 * 1024 * 1024


def _blob() -> bytes:
    return os.urandom(TWENTY_MB)


def test_boto3_put_get_20mb(stack_env):
    client = s3_client()
    data = _blob()
    client.put_object(Bucket=stack_env.bucket, Key="tests/blob.bin", Body=data)
    got = client.get_object(Bucket=stack_env.bucket, Key="tests/blob.bin")["Body"].read()
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()


def test_pyarrow_write_read_20mb(stack_env):
    fs = s3_filesystem()
    data = _blob()
    path = f"{stack_env.bucket}/tests/arrow.bin"
    with fs.open_output_stream(path) as out:
        out.write(data)
    with fs.open_input_stream(path) as inp:
        assert inp.read() == data
    assert fs.get_file_info(path).size == TWENTY_MB

    table = pa.table({"i": list(range(1000)), "caption": [f"a red circle {i}" for i in range(1000)]})
    pq.write_table(table, f"{stack_env.bucket}/tests/t.parquet", filesystem=fs)
    assert pq.read_table(f"{stack_env.bucket}/tests/t.parquet", filesystem=fs).equals(table)


def test_wrong_or_missing_secret_is_rejected(stack_env):
    client = boto3.client("s3", endpoint_url=stack_env.s3_endpoint, region_name="us-east-1",
                          aws_access_key_id=stack_env.s3_access_key.get_secret_value(),
                          aws_secret_access_key="not-the-secret")
    with pytest.raises(ClientError) as info:
        client.put_object(Bucket=stack_env.bucket, Key="tests/intruder.txt", Body=b"x")
    assert info.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    # Anonymous requests are refused too: auth is really on.
    assert requests.get(f"{stack_env.s3_endpoint}/{stack_env.bucket}/tests/blob.bin", timeout=10).status_code == 403
    wrong = S3Settings(endpoint_url=stack_env.s3_endpoint, access_key="nobody", secret_key="x",
                       bucket=stack_env.bucket)
    with pytest.raises(StorageError, match="rejected the credentials"):
        check_access(wrong)


def test_up_with_other_credentials_says_restart(stack, make_stack_settings):
    other = stack.model_copy(update={"s3_secret_key": type(stack.s3_secret_key)("another-secret")})
    with pytest.raises(stack_api.StackError, match="started with other credentials"):
        stack_api.up(other, say=lambda m: None)


def test_mlflow_artifact_lands_in_the_bucket(stack_env):
    mlflow.set_tracking_uri(stack_env.mlflow_uri)
    mlflow.set_experiment("stack-test")
    with mlflow.start_run() as run:
        mlflow.log_param("p", 1)
        mlflow.log_metric("loss", 0.5, step=3)
        mlflow.log_text("hello from the test", "notes/hello.txt")
    keys = [o["Key"] for o in s3_client().list_objects_v2(Bucket=stack_env.bucket, Prefix="mlflow/")["Contents"]]
    ours = [k for k in keys if run.info.run_id in k]
    assert ours and ours[0].endswith("artifacts/notes/hello.txt")
    body = s3_client().get_object(Bucket=stack_env.bucket, Key=ours[0])["Body"].read()
    assert body == b"hello from the test"
    assert mlflow.get_run(run.info.run_id).data.metrics["loss"] == 0.5


def _ray(stack, *args, env=None, timeout=240):
    env = {**os.environ, **stack.client_env(), **(env or {})}
    return subprocess.run([str(Path(sys.executable).parent / "ray"), *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_ray_job_submit(stack):
    code = "import ray, sys; ray.init(); print('answer', ray.get(ray.remote(lambda x: x * 6).remote(7)), sys.prefix)"
    result = _ray(stack, "job", "submit", "--address", stack.ray_dashboard_url, "--", "python", "-c", code)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"answer 42 {sys.prefix}" in result.stdout  # the job ran this virtual environment's python


def test_every_ray_tool_reaches_the_stack_from_its_client_env(stack):
    """After `eval "$(icd stack env)"` no tool needs --address: each reads the variable it knows."""
    status = _ray(stack, "status", timeout=120)
    assert status.returncode == 0 and "CPU" in status.stdout, status.stdout + status.stderr
    job = _ray(stack, "job", "submit", "--", "python", "-c", "print('from a job')", timeout=240)
    assert job.returncode == 0 and "from a job" in job.stdout, job.stdout[-2000:] + job.stderr[-2000:]
    env = {**os.environ, **stack.client_env()}
    serve_status = subprocess.run([str(Path(sys.executable).parent / "serve"), "status"], env=env, cwd=REPO,
                                  capture_output=True, text=True, timeout=120)
    assert serve_status.returncode == 0 and "applications" in serve_status.stdout, \
        serve_status.stdout + serve_status.stderr
    script = "import ray; ray.init(); print('nodes', len(ray.nodes())); ray.shutdown()"
    init = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert init.returncode == 0 and "nodes 1" in init.stdout, init.stdout + init.stderr[-3000:]


def test_ray_job_submit_without_token_is_refused(stack):
    result = _ray(stack, "job", "list", "--address", stack.ray_dashboard_url,
                  env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": "/nonexistent", "RAY_AUTH_TOKEN": "wrong"},
                  timeout=60)
    assert result.returncode != 0
    assert "token" in (result.stdout + result.stderr).lower()


def test_check_stack_job_with_working_dir(stack):
    """The demo's check: Ray Data <-> S3 and MLflow from inside a submitted job."""
    result = _ray(stack, "job", "submit", "--working-dir", ".", "--", "python", "jobs/check_stack.py")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])
    assert summary["ok"] and summary["sum_of_squares"] == sum(i * i for i in range(100))


def test_up_is_idempotent(stack):
    before = {s.name: ProcessRecord.load(s.record_path(stack)).pid for s in SERVICES}
    stack_api.up(stack, say=lambda m: None)
    after = {s.name: ProcessRecord.load(s.record_path(stack)).pid for s in SERVICES}
    assert before == after
    assert all(row.state == "healthy" for row in stack_api.status(stack))


def _stack_processes(settings) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(STACK_ID_VAR, "").startswith(settings.stack_id + "/"):
                found.append(proc)
        except psutil.Error:
            continue
    return [p for p in found if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_nothing_listens_beyond_loopback(stack):
    pids = {p.pid for p in _stack_processes(stack)}
    assert len(pids) >= 5
    listening = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in pids]
    assert listening
    exposed = [(c.pid, c.laddr) for c in listening if c.laddr.ip not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert exposed == []


def test_down_stops_everything_and_up_finds_the_data_again(stack_env):
    """Runs last in this module: restarts the session's stack."""
    client = s3_client()
    client.put_object(Bucket=stack_env.bucket, Key="tests/survivor.txt", Body=b"still here")
    mlflow.set_tracking_uri(stack_env.mlflow_uri)
    mlflow.set_experiment("stack-restart")
    with mlflow.start_run() as run:
        mlflow.log_text("artifact before restart", "before.txt")
    assert _stack_processes(stack_env)

    stopped = stack_api.down(stack_env, say=lambda m: None)
    assert sorted(stopped) == ["mlflow", "ray", "s3"]
    assert _stack_processes(stack_env) == []
    assert all(row.state == "stopped" for row in stack_api.status(stack_env))
    assert stack_api.down(stack_env, say=lambda m: None) == []  # a second down is harmless

    stack_api.up(stack_env, say=lambda m: None)
    assert client.get_object(Bucket=stack_env.bucket, Key="tests/survivor.txt")["Body"].read() == b"still here"
    assert mlflow.get_run(run.info.run_id).info.status == "FINISHED"
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="before.txt")
    assert Path(local).read_text() == "artifact before restart"
