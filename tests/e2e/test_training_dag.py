"""The whole DAG on the toy preset against the real stack, submitted with `ray job submit`:
registry state after one run, nothing retrained on a second, a worse candidate refused."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RUN = "e2e-dag"
TINY = [
    "data.dataset=e2e-shapes", "data.eval_dataset=e2e-shapes-eval", "tracking.experiment=icd-e2e",
    "data.validation_dataset=e2e-shapes-val", "train.icd.validation_count=16", "train.cycle.validation_count=16",
    "train.cfg_distill.global_batch_size=16", "train.icd.global_batch_size=16", "train.cycle.global_batch_size=4",
    *[f"train.{stage}.{key}={value}" for stage in ("cfg_distill", "icd", "cycle")
      for key, value in (("steps", 4), ("checkpoint_every", 2), ("images_every", 4))],
    # 4 steps move a model a little either way (icd: 16.1 -> 15.0 dB seen on 16 images), and one image is
    # 0.06 of an accuracy: the no-regression
    # gates here check the plumbing with a tolerance; the refusal below destroys the model outright.
    "tracking.stage_gates=[{stage: cfg_distill, metric: eps_mse, max_regression: 0.05}, "
    "{stage: icd, metric: psnr, max_regression: 3.0}, {stage: cycle, metric: psnr, max_regression: 3.0}]",
]


def submit_dag(env: dict, *extra: str, expect_failure: bool = False, with_log: bool = False):
    command = [str(BIN / "ray"), "job", "submit", "--working-dir", ".", "--", "python", "jobs/train_icd.py",
               "--config", "jobs/configs/toy.yaml", "--run", RUN, "--eval-count", "16",
               *[arg for s in TINY for arg in ("--set", s)], *extra]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    if expect_failure:
        assert done.returncode != 0, done.stdout[-3000:]
        return done.stdout + done.stderr
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]
    summary = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    return (summary, done.stdout + done.stderr) if with_log else summary


def test_dag_registers_promotes_reuses_and_refuses_a_worse_candidate(stack_env, tmp_path):
    env = {**os.environ, **stack_env.client_env()}
    made = subprocess.run([sys.executable, "jobs/make_shards.py", "--name", "e2e-shapes", "--count", "64",
                           "--eval-count", "16", "--val-count", "16"], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-2000:]
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])

    first, log = submit_dag(env, with_log=True)
    # The job log a person reads: a progress line per stage, no Ray Data bars, no known library warnings
    for stage in ("cfg_distill", "icd", "cycle"):
        assert re.search(rf"{stage}  step +\d+/\d+  loss \S+  \S+ samples/s  elapsed \S+  ETA", log), stage
    for noise in ("Parquet dataset sampling", "Already found a `peft_config`", "The parameter 'pretrained' is deprecated"):
        assert noise not in log, noise
    assert all(first["steps"][s]["action"] == "trained" for s in ("cfg_distill", "icd", "cycle"))
    assert set(first["evaluation"]["icd"]) == {"ddim50", "icd"} and set(first["evaluation"]["cycle"]) == {"cycle"}
    assert first["promoted"] is True
    champion = client.get_model_version_by_alias("icd-toy", "champion")
    assert champion.version == first["version"]
    assert float(champion.tags["metric.psnr"]) == first["evaluation"]["cycle"]["cycle"]["psnr"]
    experiment = client.get_experiment_by_name("icd-e2e").experiment_id
    assert client.get_experiment(experiment).tags["mlflow.experimentKind"] == "custom_model_development"
    children = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{first['parent_run_id']}'")
    assert {r.data.tags["icd.stage"] for r in children} == {"cfg_distill", "icd", "cycle", "evaluate_icd",
                                                            "evaluate_cycle", "register"}
    # each stage measured against its input; the curve: the input (step 0) and both kept checkpoints
    assert set(first["no_regression"]) == {"cfg_distill", "icd", "cycle"}
    icd_run = next(r for r in children if r.data.tags["icd.stage"] == "icd")
    assert sorted(m.step for m in client.get_metric_history(icd_run.info.run_id, "no_regression.psnr")) == [0, 2, 4]
    assert abs(icd_run.data.metrics["no_regression.after.psnr"] - first["no_regression"]["icd"]["psnr"]["after"]) < 1e-3
    evaluation = next(r for r in children if r.data.tags["icd.stage"] == "evaluate_cycle")
    assert {"ddim50.psnr", "icd.edit_success", "icd.inplace_success", "icd.shape_iou", "ddim50.shape_accuracy",
            "cycle.lpips_randvgg"} <= set(evaluation.data.metrics)
    model = mlflow.pyfunc.load_model("models:/icd-toy@champion")
    assert model.metadata.metadata["stage"] == "cycle"
    demo = subprocess.run([sys.executable, "jobs/demo_edit.py", "--config", "jobs/configs/toy.yaml",
                           "--set", "data.eval_dataset=e2e-shapes-eval", "--out", str(tmp_path / "edit.png")],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert demo.returncode == 0, demo.stderr[-2000:]
    shown = json.loads(demo.stdout.splitlines()[-1])
    assert shown["version"] == first["version"]
    assert shown["modes"] == {"switch": {"nfe": 8}, "p2p": {"nfe": 8}, "guided": {"nfe": 16}}, shown
    # one picture: the original and one edit per mode, side by side, each over a 14-px label strip
    picture = np.asarray(Image.open(shown["image"]).convert("RGB"), dtype=np.float32)
    panel = picture.shape[1] // 4
    assert picture.shape[1] == 4 * (picture.shape[0] - 14)
    panels = [picture[:-14, i * panel:(i + 1) * panel] for i in range(4)]
    assert all(np.abs(edited - panels[0]).mean() > 1.0 for edited in panels[1:])  # every mode changed the image

    runs_before = len(client.search_runs([experiment]))
    again = submit_dag(env)
    assert all(step["action"] in ("reused", "present", "champion") for step in again["steps"].values()), again["steps"]
    assert again["version"] == first["version"]
    assert len(client.search_runs([experiment])) == runs_before + 1  # only the new parent run

    # a cycle stage that destroys the model is refused before anything is registered
    versions = len(client.search_model_versions("name = 'icd-toy'"))
    refused = submit_dag(env, "--set", "train.cycle.lr=1.0", "--stages", "cycle,evaluate_cycle,register,promote",
                         expect_failure=True)
    assert "stage cycle made the model worse" in refused and "cycle.psnr" in refused, refused[-3000:]
    assert len(client.search_model_versions("name = 'icd-toy'")) == versions
    # with the stage gate off, the same (reused) output reaches the registry and the promotion gates refuse it
    worse = submit_dag(env, "--set", "train.cycle.lr=1.0", "--set", "tracking.stage_gates=[]",
                       "--stages", "cycle,evaluate_cycle,register,promote")
    assert worse["promoted"] is False and worse["version"] != first["version"]
    assert any("worse than the champion" in reason for reason in worse["promotion"]), worse["promotion"]
    assert client.get_model_version_by_alias("icd-toy", "champion").version == first["version"]
    assert client.get_model_version_by_alias("icd-toy", "challenger").version == worse["version"]

    # registration takes a lock on the model and the cycle output (two identical DAGs register one version):
    # while another driver holds it, the register step waits and registers nothing
    lock = f"models:/icd-toy-twin from {first['steps']['cycle']['detail']}"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, lock], env=env, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        seen = []  # Ray's connection lines come first
        for line in holder.stdout:
            seen.append(line)
            if line.strip() == "holding":
                break
        assert seen and seen[-1].strip() == "holding", "".join(seen)[-3000:]
        twin = ("--set", "tracking.registered_model=icd-toy-twin", "--stages", "evaluate_cycle,register")
        command = [str(BIN / "ray"), "job", "submit", "--working-dir", ".", "--", "python", "jobs/train_icd.py",
                   "--config", "jobs/configs/toy.yaml", "--run", RUN, "--eval-count", "16",
                   *[arg for s in TINY for arg in ("--set", s)], *twin]
        waiting = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True)
        lines = []
        for line in waiting.stdout:
            lines.append(line)
            if "being evaluated and registered by another job" in line:
                break
        assert waiting.poll() is None, "".join(lines)[-3000:]
        time.sleep(5)
        assert client.search_model_versions("name = 'icd-toy-twin'") == []
    finally:
        holder.kill()
        holder.wait()
    rest, _ = waiting.communicate(timeout=600)
    assert waiting.returncode == 0, rest[-3000:]
    registered = json.loads([line for line in rest.splitlines() if line.startswith("{")][-1])
    assert registered["steps"]["register"]["action"] == "registered" and registered["version"] == "1"
    assert len(client.search_model_versions("name = 'icd-toy-twin'")) == 1


HOLD_LOCK = """
import sys, time, ray
from icd.train.stage_lock import stage_lock
ray.init()
with stage_lock(sys.argv[1]):
    print("holding", flush=True)
    time.sleep(600)
"""
