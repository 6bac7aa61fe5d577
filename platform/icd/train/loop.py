"""``train_loop_per_worker`` of every stage: the Ray Train loop, top to bottom.

build the stage's model -> restore the latest checkpoint if Ray Train hands one over ->
wrap the objective in DDP -> for each batch of this worker's data shard: loss, backward,
clip, step, advance the LR schedule, move the EMA target if the run keeps one -> every N
steps: metrics and image grids to MLflow (rank 0), a checkpoint to storage (scored on the
validation split first when the stage exports its best checkpoint) -> at the end rank 0
exports the artifacts (the last step's or the best checkpoint's) to the stage's output.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import ray.train
import ray.train.torch
import torch

from icd.config import Config
from icd.data.feeding import epoch_batches
from icd.diffusion.boundaries import Boundaries
from icd.storage import S3Settings
from icd.train.checkpointing import TrainState, checkpoint_weights, restore_checkpoint, save_checkpoint
from icd.train.optimization import build_optimizer
from icd.train.progress import eta_s, progress_line
from icd.train.stages import build_stage_model, export_stage
from icd.train.validation import SCORE, BestWeights, Validator, selects_best

NUMERIC_COLUMNS = {"latents": ["latents", "encoder_hidden_states"], "raw": ["pixels", "input_ids", "size_ids"]}


def per_worker_batch(global_batch_size: int, world_size: int) -> int:
    if global_batch_size % world_size:
        raise ValueError(f"global_batch_size {global_batch_size} is not divisible by num_workers {world_size}")
    return global_batch_size // world_size


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """The draws of one step on one rank: different per rank, identical after a resume."""
    return torch.Generator().manual_seed(seed * 1_000_003 + rank * 7919 + step)


def autocast_for(config: Config, device: torch.device):
    """bf16/fp16 autocast on GPU when the config asks for it; a no-op on CPU."""
    if device.type != "cuda" or config.model.mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if config.model.mixed_precision == "bf16" else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def train_step(objective, latents: torch.Tensor, hidden: torch.Tensor, generator: torch.Generator, optimizer,
               trainable: dict[str, torch.nn.Parameter], grad_clip: float, lr_schedule, target=None,
               scaler: torch.amp.GradScaler | None = None, autocast=None, terms: list[str] | None = None
               ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One training step of a stage: loss, backward, clip, step, LR schedule, EMA target. Returns (losses, grad norm).

    With ``terms`` (``train.<stage>.step_per_term``) each named loss term takes its own optimizer
    step in turn, clipped over the parameters it has gradients for (one adapter: the official iCD
    code's per-model clip), as the official training does; the grad norm returned is then the
    largest term's. The LR schedule and the EMA target advance once per step either way.

    The Ray Train loop and the in-process benchmarks (`benchmarks/icd_ablation.py`) share it, so
    what a benchmark measures is what a stage trains. ``autocast`` wraps the forward pass only.
    """
    scaler = scaler or torch.amp.GradScaler("cuda", enabled=False)
    parts, norms = {}, []
    for term in terms or [None]:
        with autocast or contextlib.nullcontext():
            out = objective(latents, hidden, generator, term=term)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(out["loss"]).backward()
        scaler.unscale_(optimizer)
        # parameters without a gradient (the other adapter, in a per-term step) are left out of the norm
        norms.append(torch.nn.utils.clip_grad_norm_(list(trainable.values()), grad_clip))
        scaler.step(optimizer)  # AdamW skips parameters whose grad is None
        scaler.update()
        parts.update({k: v for k, v in out.items() if k != "loss"} if term is not None else out)
        if term is not None:
            parts["loss"] = parts.get("loss", 0.0) + out["loss"].detach()
    lr_schedule.step()
    if target is not None:
        target.update()
    return parts, torch.stack(norms).max()


def _failure_drill(drill: dict | None, rank: int, step: int) -> None:
    """Kill this worker process once at a given step (tests and operators rehearsing a worker loss)."""
    if not drill or drill["rank"] != rank or drill["step"] != step:
        return
    marker = Path(drill["marker"])
    if marker.exists():
        return
    marker.write_text(str(step))
    os.kill(os.getpid(), signal.SIGKILL)


def train_loop_per_worker(loop_config: dict) -> None:
    config = Config.model_validate(loop_config["config"])
    stage = loop_config["stage"]
    settings = S3Settings.from_config(config.storage)  # credentials from the worker's environment
    stage_config = getattr(config.train, stage)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    batch_size = per_worker_batch(stage_config.global_batch_size, world)

    torch.manual_seed(config.seed)  # the same fresh adapters on every rank
    model = build_stage_model(stage, config, loop_config.get("input_manifest"), device, settings)
    trainable = model.trainable_parameters()
    optimizer, lr_schedule = build_optimizer(trainable.values(), stage_config)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and config.model.mixed_precision == "fp16")

    state = TrainState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state = restore_checkpoint(checkpoint, trainable, optimizer, rank, model.target, lr_schedule)
        state.resumed_from.append(state.step)
    validator, best = None, BestWeights()
    if rank == 0 and selects_best(config, stage):  # only rank 0 scores and exports
        validator = Validator.from_config(config, stage, settings)
        if state.best_step is not None:  # resumed: the best so far may be an earlier checkpoint's
            best = BestWeights.resumed(state.best_step, state.best_score, state.step, trainable,
                                       lambda step: checkpoint_weights(checkpoint, step, rank))
    terms = model.objective.term_names() if stage_config.step_per_term else None
    # DDP (gloo on CPU, nccl on GPU) when world > 1; a per-term step leaves the other adapter unused
    objective = ray.train.torch.prepare_model(
        model.objective, parallel_strategy_kwargs={"find_unused_parameters": True} if terms else None)

    logger = None
    if rank == 0 and loop_config.get("mlflow"):
        from icd.train.metrics_logger import MetricsLogger

        logger = MetricsLogger(**loop_config["mlflow"])
        if state.resumed_from:
            logger.log_metrics({"resumed_from_step": state.step}, state.step)
    shard = ray.train.get_dataset_shard("train")
    boundaries = Boundaries.from_config(config.method)
    run_started = time.perf_counter()
    window = {"start": run_started, "wait": 0.0, "steps": 0}
    timed = {"start": None, "steps": 0}  # whole-run throughput, from the end of the first step

    while state.step < stage_config.steps:
        batches = iter(epoch_batches(shard, state.epoch, batch_size, config.data.shuffle_seed, device=str(device)))
        seen = 0
        while state.step < stage_config.steps:
            waited = time.perf_counter()
            batch = next(batches, None)
            window["wait"] += time.perf_counter() - waited
            if batch is None:
                break
            seen += 1
            latents, hidden = model.encode_batch(batch)
            out, grad_norm = train_step(objective, latents, hidden, step_generator(config.seed, rank, state.step),
                                        optimizer, trainable, stage_config.grad_clip, lr_schedule, model.target,
                                        scaler, autocast_for(config, device), terms)
            state.step += 1
            window["steps"] += 1
            if timed["start"] is None:
                timed["start"] = time.perf_counter()
            else:
                timed["steps"] += 1
            _failure_drill(loop_config.get("failure_drill"), rank, state.step)

            if state.step % stage_config.log_every == 0 or state.step == stage_config.steps:
                now = time.perf_counter()
                elapsed = now - window["start"]
                samples_per_s = window["steps"] * batch_size * world / elapsed
                if rank == 0:  # the job log's line; the same numbers go to MLflow
                    eta = eta_s(state.step, stage_config.steps, timed["steps"], now - timed["start"])
                    # Written, not printed: Ray Train patches print() in its workers to log the message
                    # and also echo it, so each printed line reached the job log twice.
                    sys.stdout.write(progress_line(stage, state.step, stage_config.steps, out["loss"].item(),
                                                   samples_per_s, now - run_started, eta) + "\n")
                    sys.stdout.flush()
                if logger:
                    logger.log_metrics({**{k: v.item() for k, v in out.items()}, "grad_norm": grad_norm.item(),
                                        "lr": optimizer.param_groups[0]["lr"], "samples_per_s": samples_per_s,
                                        "data_wait_fraction": window["wait"] / elapsed, "epoch": state.epoch},
                                       state.step)
                window.update(start=time.perf_counter(), wait=0.0, steps=0)
            if logger and loop_config.get("preview") and state.step % stage_config.images_every == 0:
                _log_preview(logger, model, config, boundaries, loop_config["preview"], state.step)
            if state.step % stage_config.checkpoint_every == 0 or state.step == stage_config.steps:
                elapsed = time.perf_counter() - timed["start"]
                throughput = timed["steps"] * batch_size * world / elapsed if timed["steps"] else 0.0
                scores = {}
                if validator:
                    scores[SCORE] = validator.score(model.bundle)
                    if best.offer(state.step, scores[SCORE], trainable):
                        state.best_step, state.best_score = best.step, best.score
                    scores.update(best_step=state.best_step, best_validation_psnr=state.best_score)
                    if logger:
                        logger.log_metrics({SCORE: scores[SCORE]}, state.step)
                _report(state, out, rank, trainable, optimizer, lr_schedule, throughput, model.target, scores)
        if seen == 0:
            raise RuntimeError(f"worker {rank} got no batch of {batch_size} in epoch {state.epoch}: "
                               f"the dataset is smaller than global_batch_size={stage_config.global_batch_size}")
        if state.step < stage_config.steps:
            state.epoch += 1

    if logger:  # the last metrics reach MLflow before the driver closes the run (bounded if it is down)
        logger.close(timeout_s=120)
    if rank == 0:
        if validator and best.step is not None and best.step != state.step:
            sys.stdout.write(f"{stage}: exporting step {best.step} ({SCORE} {best.score:.2f} dB, the best of the "
                             f"checkpoints) instead of step {state.step}\n")
            best.load_into(trainable)
        export_stage(model, loop_config["output_uri"], settings)


def _report(state: TrainState, out: dict, rank: int, trainable, optimizer, lr_schedule, samples_per_s: float,
            target=None, scores: dict | None = None) -> None:
    """Every rank reports (it is a barrier); rank 0 attaches the checkpoint and its validation scores."""
    metrics = {"step": state.step, "epoch": state.epoch, "loss": out["loss"].item(),
               "resumed_from": list(state.resumed_from), "samples_per_s": samples_per_s, **(scores or {})}
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="icd-ckpt-") as directory:
        save_checkpoint(Path(directory), trainable, optimizer, state, target, lr_schedule)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                         checkpoint_dir_name=f"step-{state.step:07d}")


def _log_preview(logger, model, config: Config, boundaries: Boundaries, preview: dict, step: int) -> None:
    from icd.train.objectives import GUIDANCE_ADAPTER
    from icd.train.previews import preview_grid

    columns = {k: torch.tensor(v) for k, v in preview.items() if k != "captions"}
    latents, _ = model.encode_batch(columns)
    adapter = GUIDANCE_ADAPTER if GUIDANCE_ADAPTER in model.bundle.adapters else None
    model.bundle.unet.eval()
    try:
        grid = preview_grid(model.stage, model.bundle, boundaries, latents, preview["captions"],
                            config.editing.guidance, config.editing.tau, seed=config.seed, guidance_adapter=adapter)
    finally:
        model.bundle.unet.train()
    logger.log_image(grid, key="preview", step=step)
