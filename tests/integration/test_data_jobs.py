"""The data jobs end to end on the stack: make_shards, then encode_latents submitted with `ray job submit`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as pads

from icd.storage import s3_filesystem

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _last_json(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def test_make_shards_then_encode_latents_as_a_ray_job(stack_env):
    stack = stack_env
    env = {**os.environ, **stack.client_env()}
    made = subprocess.run([sys.executable, "jobs/make_shards.py", "--name", "test-job-shapes", "--count", "120",
                           "--per-shard", "50", "--eval-count", "20"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-2000:]
    assert [_ for _ in made.stdout.splitlines() if '"count": 120' in _]

    submit = [str(BIN / "ray"), "job", "submit", "--working-dir", ".", "--", "python", "jobs/encode_latents.py",
              "--config", "jobs/configs/toy.yaml", "--set", "data.dataset=test-job-shapes"]
    first = subprocess.run(submit, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    manifest = _last_json(first.stdout)
    assert manifest["samples"] == {"ok": 120} and manifest["reused"] is False

    cache = pads.dataset(manifest["cache"].removeprefix("s3://"), filesystem=s3_filesystem(), format="parquet")
    table = cache.to_table()
    assert table.num_rows == 120 and sorted(table.column("key").to_pylist())[0] == "000000000"

    again = subprocess.run(submit, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and _last_json(again.stdout)["reused"] is True
