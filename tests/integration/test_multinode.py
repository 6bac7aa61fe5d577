"""A multi-node Ray cluster on one machine: the stack's head plus two worker nodes (icd.stack.nodes).

A two-worker stage runs one train worker per worker node, reads its shards from S3 and writes its
checkpoints and output to S3 (so nothing on a node's disk is needed to resume); a node killed with
SIGKILL leaves the cluster and only its own processes die.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from icd.stack.nodes import alive_node_resources, kill_node, node_resource, worker_nodes
from icd.stack.services import ray_auth_headers

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SETTINGS = ("data.dataset=test-multinode-shapes", "data.eval_dataset=null", "train.cfg_distill.steps=4",
            "train.cfg_distill.checkpoint_every=2", "train.cfg_distill.global_batch_size=8",
            "scaling.custom_resources_per_worker={icd_worker_node: 1}")


def state(settings, kind: str, **params) -> list[dict]:
    response = requests.get(f"{settings.ray_dashboard_url}/api/v0/{kind}", headers=ray_auth_headers(settings),
                            params={"limit": 1000, "detail": "true", **params}, timeout=30)
    return response.json()["data"]["result"]["result"]


def node_ids(settings) -> dict[str, str]:
    """custom node resource -> node id, of the live worker nodes."""
    return {name: row["node_id"] for row in state(settings, "nodes") if row["state"] == "ALIVE"
            for name in row["resources_total"] if name.startswith("icd_node_")}


@pytest.fixture(scope="module")
def cluster_stack(tmp_path_factory):
    """A stack of its own on the machine's address (worker nodes cannot join a loopback-only head)."""
    import ray._private.services

    from conftest import PORT_BASE, _settings
    from icd.stack import down, up

    settings = _settings(tmp_path_factory.mktemp("multinode-stack"), base=PORT_BASE + 300,
                         host=ray._private.services.get_node_ip_address(), ray_num_cpus=1)
    up(settings, say=lambda msg: None)
    yield settings
    down(settings, say=lambda msg: None)


def test_a_loopback_head_gets_a_clear_refusal(stack):
    from icd.stack.nodes import start_node
    from icd.stack.settings import StackError

    with pytest.raises(StackError, match="start the stack on the machine's address"):
        start_node(stack, 0)


def test_two_workers_run_one_per_node_from_and_to_s3_and_a_killed_node_leaves(cluster_stack):
    stack_env = cluster_stack
    env = {**os.environ, **stack_env.client_env()}
    made = subprocess.run([sys.executable, "jobs/make_shards.py", "--name", "test-multinode-shapes", "--count", "64",
                           "--per-shard", "32", "--eval-count", "0"], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-2000:]
    with worker_nodes(stack_env, count=2) as nodes:
        ids = node_ids(stack_env)
        assert set(ids) == {node_resource(0), node_resource(1)} and len(set(ids.values())) == 2
        command = [str(BIN / "ray"), "job", "submit", "--working-dir", ".", "--", "python", "jobs/train_stage.py",
                   "--stage", "cfg_distill", "--config", "jobs/configs/toy.yaml", "--run", "test-multinode",
                   *[arg for s in SETTINGS for arg in ("--set", s)]]
        done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
        manifest = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
        # each node has its own session dir, so a worker's output reaches the job log once, not once per node
        assert len(re.findall(r"cfg_distill  step +4/4", done.stdout)) == 1, done.stdout[-4000:]
        # one train worker on each worker node (and none on the head)
        workers = [a for a in state(stack_env, "actors") if a["class_name"] == "RayTrainWorker"
                   and a["node_id"] in ids.values()]
        assert sorted(a["node_id"] for a in workers) == sorted(ids.values()), workers
        # shards from S3, checkpoints and output in S3
        assert manifest["output"].startswith("s3://") and manifest["steps"] == 4
        from icd.config import load_config
        from icd.evaluation.stage_check import kept_checkpoints
        from icd.storage import S3Settings
        from icd.train.stages import StagePaths

        config = load_config("jobs/configs/toy.yaml", list(SETTINGS))
        paths = StagePaths.of(config, "cfg_distill", "test-multinode", settings=S3Settings.from_env(env))
        kept = kept_checkpoints(paths.storage_path, paths.trainer_name, S3Settings.from_env(env))
        assert kept and all(uri.startswith("s3://") for uri in kept.values()), kept
        # a node lost: its processes die, the head notices, the other node stays
        doomed = nodes[0].processes()
        kill_node(nodes[0])
        assert not any(p.is_running() and p.status() != "zombie" for p in doomed)
        deadline = time.monotonic() + 120
        while node_resource(0) in alive_node_resources(stack_env) and time.monotonic() < deadline:
            time.sleep(2)
        assert alive_node_resources(stack_env) == {node_resource(1)}
        assert nodes[1].alive()
    assert not nodes[1].alive()  # the fixture stops what it started


def test_nodes_whose_starter_was_killed_are_found_and_stopped(cluster_stack):
    """A benchmark killed with SIGKILL leaves its worker nodes running; `down` stops them by their tag."""
    from icd.stack.nodes import stop_leftover_nodes

    values = {**cluster_stack.model_dump(mode="json"),
              **{k: getattr(cluster_stack, k).get_secret_value() for k in ("s3_access_key", "s3_secret_key")}}
    starter = subprocess.Popen([sys.executable, "-c", f"""
import json, time
from icd.stack import StackSettings
from icd.stack.nodes import start_node
settings = StackSettings(_env_file=None, **json.loads({json.dumps(values)!r}))
start_node(settings, 1)
print("started", flush=True)
time.sleep(600)
"""], stdout=subprocess.PIPE, text=True)
    assert starter.stdout.readline().strip() == "started"
    starter.kill()
    starter.wait()
    assert alive_node_resources(cluster_stack) == {node_resource(1)}  # the node outlived its starter
    assert stop_leftover_nodes(cluster_stack) == [1]
    deadline = time.monotonic() + 120
    while alive_node_resources(cluster_stack) and time.monotonic() < deadline:
        time.sleep(2)
    assert alive_node_resources(cluster_stack) == set()
    assert stop_leftover_nodes(cluster_stack) == []
