"""Two identical stage submissions at once: one trains, the other waits and reuses its output; a
driver that dies holding the stage lock releases it (icd.train.stage_lock)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SETTINGS = ("data.dataset=test-concurrent-shapes", "data.eval_dataset=null", "train.cfg_distill.steps=4",
            "train.cfg_distill.checkpoint_every=2", "train.cfg_distill.global_batch_size=8")


def submit(env) -> subprocess.Popen:
    command = [str(BIN / "ray"), "job", "submit", "--working-dir", ".", "--", "python", "jobs/train_stage.py",
               "--stage", "cfg_distill", "--config", "jobs/configs/toy.yaml", "--run", "test-concurrent",
               *[arg for s in SETTINGS for arg in ("--set", s)]]
    return subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_identical_submissions_train_once(stack_env):
    env = {**os.environ, **stack_env.client_env()}
    made = subprocess.run([sys.executable, "jobs/make_shards.py", "--name", "test-concurrent-shapes", "--count", "64",
                           "--per-shard", "32", "--eval-count", "0"], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-2000:]
    jobs = [submit(env), submit(env)]
    logs = [job.communicate(timeout=900)[0] for job in jobs]
    assert all(job.returncode == 0 for job in jobs), [log[-3000:] for log in logs]
    manifests = [json.loads([line for line in log.splitlines() if line.startswith("{")][-1]) for log in logs]
    trained = [m for m in manifests if not m["reused"]]
    assert len(trained) == 1, [m["reused"] for m in manifests]
    waited = logs[manifests.index(next(m for m in manifests if m["reused"]))]
    assert "being trained by another job" in waited or "already trained" in waited
    same = {k: v for k, v in trained[0].items() if k != "reused"}
    other = next(m for m in manifests if m["reused"])
    assert {k: v for k, v in other.items() if k != "reused"} == same  # the one output, read back


HOLD = """
import os, sys, time, ray
from icd.train.stage_lock import stage_lock
ray.init()
with stage_lock("s3://icd-test/models/lock-test"):
    print("holding", flush=True)
    time.sleep(600)
"""


def test_a_driver_killed_while_holding_a_stage_lock_releases_it(stack_env):
    env = {**os.environ, **stack_env.client_env()}
    holder = subprocess.Popen([sys.executable, "-c", HOLD], env=env, cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        probe = subprocess.run([sys.executable, "-c", """
import ray
from icd.train.stage_lock import NAMESPACE, lock_name
ray.init()
try:
    ray.get_actor(lock_name("s3://icd-test/models/lock-test"), namespace=NAMESPACE)
    print("locked")
except ValueError:
    print("free")
"""], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert probe.stdout.strip().splitlines()[-1] == "locked", probe.stderr[-2000:]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    took = subprocess.run([sys.executable, "-c", """
import ray
from icd.train.stage_lock import stage_lock
ray.init()
with stage_lock("s3://icd-test/models/lock-test", timeout_s=120, poll_s=1) as waited:
    print("acquired", "after waiting" if waited else "at once")
"""], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert "acquired" in took.stdout, took.stderr[-2000:]
