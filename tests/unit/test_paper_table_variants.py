"""The paper table's variants: which settings each row trains with (benchmarks/paper_table.py)."""

import argparse
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def paper_table():
    spec = importlib.util.spec_from_file_location("paper_table", ROOT / "benchmarks" / "paper_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def training_args(paper_table, config: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    paper_table.add_training_arguments(parser)
    return parser.parse_args(["--config", str(ROOT / "jobs" / "configs" / config)])


def test_toy_pure_cd_rows_use_the_eps_distance_and_an_ema_target(paper_table):
    configs = paper_table.variant_configs(training_args(paper_table, "toy.yaml"), seed=1)
    for row in ("icd2", "icd3", "icd4"):
        method = configs[row].method
        assert (method.lambda_forward, method.lambda_reverse) == (0, 0), row
        assert (method.consistency_space, method.target_ema_decay) == ("eps", 0.95), row
    for row in ("icd4_lf", "icd4_lf_lr"):  # the preservation rows keep the preset's distance and online target
        method = configs[row].method
        assert (method.consistency_space, method.target_ema_decay) == ("latent", 0.0), row
    assert configs["icd4"].seed == 1 and configs["icd4"].train.icd.steps == 120


def test_other_presets_keep_their_own_pure_cd_settings(paper_table):
    configs = paper_table.variant_configs(training_args(paper_table, "sd15.yaml"))
    assert configs["icd4"].method.consistency_space == "latent"
    assert configs["icd4"].method.target_ema_decay == 0.0
