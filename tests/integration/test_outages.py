"""Object storage and the tracking server both go away for 30 s while a stage trains (stopped and
started again as services of the stack): the stage finishes, on the first submission or on a
resubmission that resumes from S3, and its output is complete. (Each outage alone, measured
2026-12-03: the stage finished on its first submission, no restart.)"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from icd.stack.lifecycle import stop_services, up

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
OUTAGE_S = 30


def stage_command(run: str, steps: int) -> list[str]:
    settings = ("data.dataset=test-outage-shapes", "data.eval_dataset=null", "train.icd.export=last",
                f"train.icd.steps={steps}",
                "train.icd.checkpoint_every=4", "train.icd.global_batch_size=8", "train.icd.log_every=1",
                f"train.icd.images_every={steps}", "train.cfg_distill.steps=2", "train.cfg_distill.global_batch_size=8")
    return [str(BIN / "ray"), "job", "submit", "--working-dir", ".", "--", "python", "jobs/train_stage.py",
            "--config", "jobs/configs/toy.yaml", "--run", run, *[a for s in settings for a in ("--set", s)]]


def wait_for_step(process: subprocess.Popen, stage: str, step: int, lines: list[str]) -> bool:
    """Read the job's output up to rank 0's progress line of ``step``; False if the job ended first."""
    pattern = re.compile(rf"{stage}  step +{step}/")
    for line in process.stdout:
        lines.append(line)
        if pattern.search(line):
            return True
    return False


def test_a_stage_survives_30_s_without_object_storage_and_tracking(stack_env):
    env = {**os.environ, **stack_env.client_env()}
    made = subprocess.run([sys.executable, "jobs/make_shards.py", "--name", "test-outage-shapes", "--count", "64",
                           "--per-shard", "32", "--eval-count", "0", "--skip-existing"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-2000:]
    run = "test-outage"
    first = subprocess.run([*stage_command(run, 24), "--stage", "cfg_distill"], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:]
    job = subprocess.Popen([*stage_command(run, 24), "--stage", "icd"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    assert wait_for_step(job, "icd", 2, lines), "".join(lines)[-3000:]
    assert job.poll() is None  # the outage starts while the stage trains
    stop_services(stack_env, ["s3", "mlflow"])
    time.sleep(OUTAGE_S)
    up(stack_env, say=lambda msg: None)
    rest, _ = job.communicate(timeout=900)
    log = "".join(lines) + rest
    attempts = 1
    if job.returncode != 0:  # failed with a message: a resubmission resumes from the last checkpoint in S3
        again = subprocess.run([*stage_command(run, 24), "--stage", "icd"], env=env, cwd=REPO, capture_output=True,
                               text=True, timeout=900)
        assert again.returncode == 0, again.stdout[-4000:]
        log += again.stdout
        attempts = 2
    manifest = json.loads([line for line in log.splitlines() if line.startswith("{")][-1])
    assert manifest["steps"] == 24 and manifest["output"].startswith("s3://")
    print(f"S3 + MLflow outage: finished after {attempts} submission(s); resumed from {manifest['resumed_from']}")
