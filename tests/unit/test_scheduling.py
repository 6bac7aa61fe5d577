"""The idle back-off of Ray Data's scheduling loop: it sleeps exactly when a step moved nothing."""

from __future__ import annotations

from types import SimpleNamespace

import ray.data

from icd.data import scheduling
from icd.data.scheduling import IDLE_SLEEP_S, IdleBackoff, register_idle_backoff


def _executor(*ops: dict) -> SimpleNamespace:
    fields = ("num_inputs_received", "num_tasks_submitted", "num_tasks_finished", "num_task_outputs_generated",
              "num_outputs_taken")
    # The executor's topology maps each operator to its state; iterating it yields the operators.
    return SimpleNamespace(_topology=[SimpleNamespace(metrics=SimpleNamespace(**{f: op.get(f, 0) for f in fields}))
                                      for op in ops])


def test_sleeps_only_after_a_step_without_progress(monkeypatch):
    slept = []
    monkeypatch.setattr(scheduling.time, "sleep", slept.append)
    backoff = IdleBackoff()
    backoff.on_execution_step(_executor({"num_tasks_submitted": 1}, {}))  # first step: nothing to compare with
    assert slept == []
    backoff.on_execution_step(_executor({"num_tasks_submitted": 1}, {}))  # nothing moved
    assert slept == [IDLE_SLEEP_S]
    for moved in ("num_inputs_received", "num_tasks_finished", "num_task_outputs_generated", "num_outputs_taken"):
        backoff.on_execution_step(_executor({"num_tasks_submitted": 1}, {moved: len(slept)}))
        assert slept == [IDLE_SLEEP_S], f"slept although {moved} changed"
        backoff.on_execution_step(_executor({"num_tasks_submitted": 1}, {moved: len(slept)}))
        assert slept == [IDLE_SLEEP_S] * 2
        slept.pop()


def test_registered_once_per_context():
    context = ray.data.DataContext()
    register_idle_backoff(context)
    register_idle_backoff(context)
    assert context.custom_execution_callback_classes.count(IdleBackoff) == 1
    assert IdleBackoff in context.execution_callback_classes
