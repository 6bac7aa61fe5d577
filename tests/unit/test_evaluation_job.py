"""An evaluation is reused only when it was made with the same settings and metric definitions."""

import json

import pytest

import icd.evaluation.job as job
from icd.config import load_config
from icd.storage import S3Settings


LOCAL = S3Settings(endpoint_url=None, bucket="unused")  # the evaluation lives in a local folder here


class Recomputed(Exception):
    pass


def test_an_evaluation_under_older_metric_definitions_is_recomputed(tmp_path, monkeypatch):
    config = load_config("jobs/configs/toy.yaml", [])
    manifest = {"output": str(tmp_path), "stage": "cycle"}
    current = {"key": job.evaluation_key(config, 128, False), "rows": {"cycle": {"psnr": 25.0}}}
    (tmp_path / job.EVALUATION).write_text(json.dumps(current))
    assert job.evaluate_stage(config, manifest, 128, settings=LOCAL)["reused"]

    # The same file read by code whose PSNR means something else: it must evaluate again.
    monkeypatch.setattr(job, "METRICS_VERSION", job.METRICS_VERSION + 1)

    def load_eval_images(*args, **kwargs):
        raise Recomputed

    monkeypatch.setattr("icd.evaluation.reconstruction.load_eval_images", load_eval_images)
    with pytest.raises(Recomputed):
        job.evaluate_stage(config, manifest, 128, settings=LOCAL)
