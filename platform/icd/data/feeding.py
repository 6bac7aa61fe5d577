"""Feeding Ray Train workers: each worker iterates its own shard with a per-epoch shuffle seed.

Inside ``train_loop_per_worker``::

    shard = ray.train.get_dataset_shard("train")
    for epoch in itertools.count():
        for batch in epoch_batches(shard, epoch, batch_size, seed):
            ...
"""

from __future__ import annotations

from collections.abc import Iterator

import ray.train
from ray.data import ExecutionOptions


def epoch_batches(shard, epoch: int, batch_size: int, seed: int, shuffle_buffer: int | None = None,
                  device: str = "auto") -> Iterator[dict]:
    """Torch batches of one epoch; the local shuffle is seeded by (seed, epoch), so runs repeat exactly."""
    buffer = shuffle_buffer if shuffle_buffer is not None else 4 * batch_size
    return shard.iter_torch_batches(batch_size=batch_size, drop_last=True, device=device,
                                    local_shuffle_buffer_size=buffer or None,
                                    local_shuffle_seed=seed * 100_003 + epoch if buffer else None)


def ingest_config(preserve_order: bool) -> ray.train.DataConfig:
    """Ray Train's dataset config, with Ray Data delivering blocks in read order when ``preserve_order``.

    Without it a block goes out when its read finishes, so which rows a worker sees, and in what
    order, follows the read tasks' timing and a rerun trains on other batches. With it the blocks
    leave in file order, the splitter hands them out by a fixed rule (the split with the fewest rows
    so far), and each worker's local shuffle is seeded, so a rerun repeats its batches exactly.
    """
    options: ExecutionOptions = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = preserve_order
    return ray.train.DataConfig(execution_options=options)
