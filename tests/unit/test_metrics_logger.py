"""Rank 0's MLflow logging survives the tracking server going away: nothing blocks, nothing is lost
(within the queue's bound), one warning, and everything arrives once the server is back."""

import socket
import subprocess
import sys
import time
import warnings

import mlflow
import numpy as np
import pytest
import requests

from icd.train.metrics_logger import MetricsLogger


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(db, port, artifacts):
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}",
                               "--default-artifact-root", str(artifacts), "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env={**__import__("os").environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                return server
        except requests.RequestException:
            time.sleep(0.5)
    server.kill()
    raise RuntimeError("mlflow server did not start")


class DownClient:
    """A tracking client whose server never answers."""

    def log_batch(self, *args, **kwargs):
        raise ConnectionError("connection refused")

    log_image = log_batch


def test_a_long_outage_keeps_the_newest_payloads_and_warns_once():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logger = MetricsLogger("unused", "run", max_queued=3, retry_s=0.05, client=DownClient())
        for step in range(5):
            logger.log_metrics({"loss": 1.0}, step)
        time.sleep(0.3)
        assert not logger.flush(timeout_s=0.2)
        logger.close(timeout_s=0.1)
    assert logger.dropped == 2 and logger.failures >= 2
    messages = [str(w.message) for w in caught]
    assert sum("did not take metrics" in m for m in messages) == 1  # one warning however many failures
    assert sum("dropping the oldest" in m for m in messages) == 1
    assert any("not sent" in m for m in messages)


def test_metrics_logged_while_mlflow_is_down_arrive_when_it_is_back(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # our queue retries, not the client's backoff
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    port, db = free_port(), tmp_path / "mlflow.db"
    uri = f"http://127.0.0.1:{port}"
    server = start_server(db, port, tmp_path / "artifacts")
    try:
        run_id = mlflow.MlflowClient(uri).create_run(mlflow.MlflowClient(uri).create_experiment("outage")).info.run_id
        logger = MetricsLogger(uri, run_id, retry_s=0.5)
        for step in range(5):
            logger.log_metrics({"loss": float(step)}, step)
        assert logger.flush(timeout_s=60)
        server.terminate()
        server.wait(timeout=30)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(5, 15):  # the training goes on: these calls only queue
                logger.log_metrics({"loss": float(step)}, step)
            logger.log_image(np.zeros((8, 8, 3), dtype=np.uint8), key="preview", step=14)
            time.sleep(2)
            assert logger.queued >= 10 and logger.failures >= 1
        assert sum("did not take metrics" in str(w.message) for w in caught) == 1
        server = start_server(db, port, tmp_path / "artifacts")
        assert logger.flush(timeout_s=90)
        logger.close()
        history = mlflow.MlflowClient(uri).get_metric_history(run_id, "loss")
        assert sorted(m.step for m in history) == list(range(15))
        assert [m.value for m in sorted(history, key=lambda m: m.step)] == [float(s) for s in range(15)]
    finally:
        server.terminate()
        server.wait(timeout=30)
