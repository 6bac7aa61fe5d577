"""A training checkpoint: the trainable weights, the optimizer, and where the loop stood.

One directory, reported to Ray Train (which copies it to ``RunConfig.storage_path``):

    trainable.safetensors   the parameters that train (LoRA weights, w-embedding, or the whole UNet)
    target.safetensors      the EMA consistency target's adapters, when the run keeps one
    optimizer.pt            AdamW state (tensors only; loaded with ``weights_only=True``)
    scheduler.pt            the learning-rate schedule's position (absent in checkpoints written before it)
    state.json              step, epoch, the steps it resumed from, the best validation step and score
"""

from __future__ import annotations

import json
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import ray.train
import torch
from safetensors.torch import load_file, save_file
from torch.optim.lr_scheduler import LRScheduler

from icd.train.target import EMATarget


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    resumed_from: list[int] = field(default_factory=list)
    # train.<stage>.export: best_validation: the best-scoring checkpoint so far (icd.train.validation)
    best_step: int | None = None
    best_score: float | None = None


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}


def save_checkpoint(directory: Path, trainable: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                    state: TrainState, target: EMATarget | None = None, scheduler: LRScheduler | None = None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(_cpu(trainable), str(directory / "trainable.safetensors"))
    if target is not None:
        save_file(_cpu(target.state_dict()), str(directory / "target.safetensors"))
    torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    if scheduler is not None:
        torch.save(scheduler.state_dict(), directory / "scheduler.pt")
    (directory / "state.json").write_text(json.dumps(asdict(state)))
    return directory


def load_checkpoint(directory: Path, trainable: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                    target: EMATarget | None = None, scheduler: LRScheduler | None = None) -> TrainState:
    """Restore weights, optimizer (EMA target, LR schedule) in place; the checkpoint must hold exactly the trainable
    parameters."""
    directory = Path(directory)
    weights = load_file(str(directory / "trainable.safetensors"))
    missing, unexpected = sorted(set(trainable) - set(weights)), sorted(set(weights) - set(trainable))
    if missing or unexpected:
        raise ValueError(f"checkpoint {directory} does not match the model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]} (was it written by another stage or config?)")
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(weights[name].to(param.device, param.dtype))
    optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True, map_location="cpu"))
    if target is not None:
        if not (directory / "target.safetensors").exists():
            raise ValueError(f"checkpoint {directory} has no target.safetensors, but method.target_ema_decay is set "
                             f"(was it written by a run without an EMA target?)")
        target.load_state_dict(load_file(str(directory / "target.safetensors")))
    state = TrainState(**json.loads((directory / "state.json").read_text()))
    if scheduler is not None:
        _restore_schedule(scheduler, directory / "scheduler.pt", state.step)
    return state


def _restore_schedule(scheduler: LRScheduler, path: Path, step: int) -> None:
    if path.exists():
        scheduler.load_state_dict(torch.load(path, weights_only=True))
        return
    # Written before schedules were checkpointed (by a constant-rate run, the only kind then):
    # the schedule is a function of the step count alone, so walk it there.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
        for _ in range(step):
            scheduler.step()


def restore_checkpoint(checkpoint: ray.train.Checkpoint, trainable: dict[str, torch.nn.Parameter],
                       optimizer: torch.optim.Optimizer, rank: int, target: EMATarget | None = None,
                       scheduler: LRScheduler | None = None) -> TrainState:
    """``load_checkpoint`` from a checkpoint in storage, through a private local copy per worker.

    Not ``Checkpoint.as_directory()``: its directory is shared by the workers of a node, and a
    worker that arrives after the first download has finished downloads again over the files
    the first is still reading (seen as a corrupt optimizer.pt on resume).
    """
    with tempfile.TemporaryDirectory(prefix=f"icd-resume-rank{rank}-") as directory:
        return load_checkpoint(Path(checkpoint.to_directory(directory)), trainable, optimizer, target, scheduler)


def checkpoint_weights(checkpoint: ray.train.Checkpoint, step: int, rank: int) -> dict[str, torch.Tensor]:
    """The trainable weights of the run's checkpoint at ``step``: the sibling ``step-NNNNNNN`` of ``checkpoint``.

    Ray Train keeps it while it scores best (``checkpoint_score_attribute``), so a resumed run gets
    back the weights it would export.
    """
    sibling = ray.train.Checkpoint(path=f"{checkpoint.path.rstrip('/').rsplit('/', 1)[0]}/step-{step:07d}",
                                   filesystem=checkpoint.filesystem)
    with tempfile.TemporaryDirectory(prefix=f"icd-best-rank{rank}-") as directory:
        return load_file(str(Path(sibling.to_directory(directory)) / "trainable.safetensors"))
