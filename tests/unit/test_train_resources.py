"""The pre-flight check of a stage's resources: what it needs, what is short, who holds it."""

from __future__ import annotations

import pytest

from icd.config import ScalingConfig
from icd.train.resources import (ClusterBusyError, Holder, busy_message, shortfall, stage_demand,
                                 wait_for_resources, worker_bundles)


def test_demand_is_the_workers_plus_one_data_task_and_never_below_a_sampling_task():
    toy = ScalingConfig(num_workers=2, use_gpu=False, cpus_per_worker=0.75, gpus_per_worker=0)
    assert stage_demand(toy) == {"CPU": 1.75}
    tiny = ScalingConfig(num_workers=1, use_gpu=False, cpus_per_worker=0.25, gpus_per_worker=0)
    assert stage_demand(tiny) == {"CPU": 1.0}  # Ray Data's Parquet sampling takes a whole CPU
    gpus = ScalingConfig(num_workers=8, use_gpu=True, cpus_per_worker=8, gpus_per_worker=1)
    assert stage_demand(gpus) == {"CPU": 64.25, "GPU": 8.0}
    assert worker_bundles(gpus) == [{"CPU": 8, "GPU": 1}] * 8


def test_shortfall():
    assert shortfall({"CPU": 1.75}, {"CPU": 2.0}) == {}
    assert shortfall({"CPU": 1.75}, {"CPU": 1.75}) == {}
    assert shortfall({"CPU": 1.75}, {"CPU": 0.75}) == {"CPU": 1.0}
    assert shortfall({"CPU": 1.0, "GPU": 1.0}, {"CPU": 4.0}) == {"GPU": 1.0}


def test_the_message_names_the_holders_and_the_command_that_frees_them():
    holders = [Holder("ServeReplica:icd:Editor", {"CPU": 0.75}), Holder("ServeReplica:icd:Gateway", {"CPU": 0.25}),
               Holder("ProxyActor", {})]
    text = busy_message("icd", {"CPU": 1.75}, {"CPU": 2.0}, {"CPU": 1.0}, holders, 30.2)
    assert "needs 1.75 CPU" in text and "1 CPU free of 2 CPU" in text and "after 30 s" in text
    assert "ServeReplica:icd:Editor (0.75 CPU)" in text and "ProxyActor" not in text
    assert "icd serve down" in text
    other = busy_message("icd", {"CPU": 1.75}, {"CPU": 2.0}, {"CPU": 1.0}, [Holder("Trainer", {"CPU": 1})], 30)
    assert "icd serve down" not in other and "scaling.cpus_per_worker" in other


def test_wait_fails_after_the_timeout_and_returns_at_once_when_it_fits(monkeypatch):
    import ray

    free = {"CPU": 0.5}
    monkeypatch.setattr(ray, "available_resources", lambda: free)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.setattr("icd.train.resources.resource_holders", lambda: [Holder("ServeReplica:icd:Editor", {"CPU": 1.5})])
    monkeypatch.setattr("icd.train.resources._ask_autoscaler", lambda bundles: bool(bundles))
    toy = ScalingConfig(num_workers=2, use_gpu=False, cpus_per_worker=0.75, gpus_per_worker=0)
    said = []
    with pytest.raises(ClusterBusyError, match="ServeReplica:icd:Editor"):
        wait_for_resources("cfg_distill", toy, timeout_s=0.3, poll_s=0.05, say=said.append)
    assert said and "waiting up to" in said[0]
    free["CPU"] = 2.0
    wait_for_resources("cfg_distill", toy, timeout_s=0.3, poll_s=0.05)
    free["CPU"] = 0.0
    wait_for_resources("cfg_distill", toy, timeout_s=0)  # 0: no check
