"""An idle back-off for Ray Data's scheduling loop.

Ray Data's streaming executor (2.60) blocks in ``ray.wait`` for task outputs. Once every
operator is backpressured (the read-ahead filled its object-store budget and the trainer has not
taken the next batch yet), a task's outputs are ready but not read, so the wait returns at once
and the loop spins: measured with py-spy, the ``SplitCoordinator`` that feeds Ray Train workers
used 91 % of a core during a toy cfg_distill run, on a 2-core node whose other core was the
train worker's. The callback below sleeps a few milliseconds after each loop step in which
nothing moved (no input taken, task submitted or finished, output produced or taken), which
bounds the loop's CPU use and delays the reaction to the consumer by at most that long.
It plugs in through the DataContext field ``custom_execution_callback_classes``; Ray 2.60
exports ``ExecutionCallback`` only from its internal module, so an upgrade may move the import.
"""

from __future__ import annotations

import time

import ray.data
from ray.data._internal.execution.execution_callback import ExecutionCallback

IDLE_SLEEP_S = 0.01  # at most ~100 idle loop steps a second


class IdleBackoff(ExecutionCallback):
    """Sleep IDLE_SLEEP_S after a scheduling-loop step in which no operator made progress."""

    def __init__(self):
        self._last = None

    def on_execution_step(self, executor) -> None:
        progress = tuple(
            (m.num_inputs_received, m.num_tasks_submitted, m.num_tasks_finished, m.num_task_outputs_generated,
             m.num_outputs_taken)
            for m in (op.metrics for op in (getattr(executor, "_topology", None) or {})))
        if progress == self._last:
            time.sleep(IDLE_SLEEP_S)
        self._last = progress


def register_idle_backoff(context: ray.data.DataContext | None = None) -> None:
    """Add IdleBackoff to ``context``: a dataset's own (``ds.context``, which its derived datasets
    share and which travels into the SplitCoordinator actor that feeds Ray Train workers), or the
    process's current one, which datasets created afterwards copy."""
    context = context or ray.data.DataContext.get_current()
    if IdleBackoff not in context.custom_execution_callback_classes:
        context.custom_execution_callback_classes.append(IdleBackoff)
