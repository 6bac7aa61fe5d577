"""Samples/s of each stage under Ray Train's TorchTrainer against the same loop in a plain process.

    eval "$(icd stack env)"
    python benchmarks/train_throughput.py [--steps 60,36,24]

Same model, same global batch (the toy preset's), same one core each: TorchTrainer with one
CPU worker (data streamed from the latent cache in S3 by Ray Data, metrics to MLflow,
a checkpoint at the end) against the loop's arithmetic in this process on one thread with
a batch already in memory, and against the bound: the UNet (and VAE decoder) passes one step
of the objective makes, recorded with their inputs and replayed on a plain UNet with the LoRA
fused in (no adapter code, no loss arithmetic, one backward over the passes that had
gradients). Throughput is counted from the end of the first step, so model loading and Ray
start-up are excluded. The stages run in order (each needs the previous one's output) under a
fresh run name.
Last line: {"<stage>": {"ray_samples_per_s": ..., "plain_samples_per_s": ..., "bound_samples_per_s": ...,
"overhead": ..., "plain_over_bound": ...}, ...}
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from icd.config import load_config
from icd.train.loop import per_worker_batch, step_generator
from icd.train.optimization import build_optimizer
from icd.train.stages import STAGES, build_stage_model


def plain_samples_per_s(config, stage: str, input_manifest: dict | None, batch: dict, steps: int
                        ) -> tuple[float, float]:
    """(the train loop's arithmetic without Ray, the bound of its passes), in samples/s, measured alternately."""
    stage_config = getattr(config.train, stage)
    model = build_stage_model(stage, config, input_manifest)
    trainable = list(model.trainable_parameters().values())
    optimizer, lr_schedule = build_optimizer(trainable, stage_config)
    latents, hidden = model.encode_batch({k: torch.as_tensor(v) for k, v in batch.items()})

    def train_step(step: int) -> None:
        out = model.objective(latents, hidden, step_generator(config.seed, 0, step))
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(trainable, stage_config.grad_clip)
        optimizer.step()
        lr_schedule.step()

    passes = record_passes(model, lambda: train_step(0))
    bound = bound_step(model.bundle, passes)
    loop_times, bound_times = [], []
    for step in range(1, steps):  # alternate, so drifts of the machine hit both alike
        started = time.perf_counter()
        train_step(step)
        loop_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        bound()
        bound_times.append(time.perf_counter() - started)
    return len(latents) / statistics.median(loop_times), len(latents) / statistics.median(bound_times)


def record_passes(model, step) -> list[tuple]:
    """The UNet and VAE-decoder calls of one training step: (module, args, kwargs, grad enabled), inputs detached."""
    modules = [("unet", model.bundle.unet), ("vae_decoder", model.bundle.vae.decoder)]
    teacher = getattr(model.objective, "teacher", None)  # cfg_distill's frozen copy in a full fine-tune
    decoder = getattr(model.objective, "decoder", None)  # cycle's fused reverse model
    for extra in (teacher, decoder and decoder.unet):
        if extra is not None:
            modules.append(("unet", extra))
    passes, handles = [], []
    for name, module in modules:
        def hook(module, args, kwargs, name=name):
            detach = lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v  # noqa: E731
            passes.append((name, [detach(a) for a in args], {k: detach(v) for k, v in kwargs.items()},
                           torch.is_grad_enabled()))
        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        step()
    finally:
        for handle in handles:
            handle.remove()
    return passes


def bound_step(bundle, passes: list[tuple]):
    """One step's passes replayed on plain modules: a UNet with the trained LoRA fused in, the VAE decoder."""
    import copy

    from icd.models.fused import fused_unet

    adapters = bundle.adapters
    plain = {"unet": fused_unet(bundle.unet, adapters[0]) if adapters else copy.deepcopy(bundle.unet),
             "vae_decoder": bundle.vae.decoder}

    def run() -> None:
        outputs = []
        for name, args, kwargs, grad in passes:
            with torch.set_grad_enabled(grad):
                first = args[0].requires_grad_(grad) if args else kwargs["sample"].requires_grad_(grad)
                rest = args[1:] if args else ()
                out = plain[name](first, *rest, **({k: v for k, v in kwargs.items() if k != "sample"}))
            if grad:
                out = out.sample if hasattr(out, "sample") else out
                outputs.append(out.float().mean())
        if outputs:
            torch.stack(outputs).sum().backward()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="jobs/configs/toy.yaml")
    parser.add_argument("--steps", default="60,36,24", help="steps of cfg_distill,icd,cycle")
    args = parser.parse_args()
    steps = dict(zip(STAGES, (int(s) for s in args.steps.split(","))))

    import ray

    from icd.data.latent_cache import ensure_latent_cache, read_latent_cache
    from icd.train.runner import run_stage

    run = f"throughput-{int(time.time())}"
    sets = ["scaling.num_workers=1", "scaling.cpus_per_worker=1"]
    for stage, n in steps.items():
        sets += [f"train.{stage}.steps={n}", f"train.{stage}.checkpoint_every={n}", f"train.{stage}.images_every={n + 1}"]
    config = load_config(args.config, sets)
    ray.init(address="local", num_cpus=2, object_store_memory=512 * 1024 * 1024, include_dashboard=False,
             log_to_driver=False)
    cache = ensure_latent_cache(config)["cache"]
    torch.set_num_threads(1)  # the Ray worker holds one CPU, so one thread
    results, previous = {}, None
    for stage in STAGES:
        batch_size = per_worker_batch(getattr(config.train, stage).global_batch_size, 1)
        batch = read_latent_cache(cache).select_columns(["latents", "encoder_hidden_states"]).take_batch(
            batch_size, batch_format="numpy")
        manifest = run_stage(config, stage, run=run)
        ray_rate = manifest["samples_per_s"]
        plain_rate, bound_rate = plain_samples_per_s(config, stage, previous, batch, steps[stage])
        results[stage] = {"ray_samples_per_s": round(ray_rate, 2), "plain_samples_per_s": round(plain_rate, 2),
                          "bound_samples_per_s": round(bound_rate, 2), "overhead": round(1 - ray_rate / plain_rate, 3),
                          "plain_over_bound": round(plain_rate / bound_rate, 3)}
        print(f"{stage}: {results[stage]}", flush=True)
        previous = manifest
    ray.shutdown()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
