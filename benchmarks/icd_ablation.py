"""A/B of the icd stage's training options on the toy preset, in one process (no cluster needed).

    python benchmarks/icd_ablation.py --options before,clean_jump,unguided --seeds 0,1 --checkpoints 0,120,480

Builds a training set of shapes-world latents (seeds 0..N-1, the renderer's own images through
the toy VAE) and a held-out set (`jobs/make_shards.py`'s eval seeds), trains cfg_distill once
(cached under --work), then the icd stage once per option and seed with the same step as the
Ray Train workers (`icd.train.loop.train_step`) on one rank. At every step of --checkpoints it
evaluates the 4-step model on the held-out images: reconstruction PSNR (unguided, the mean of
per-image PSNRs), latent MSE, and caption accuracy of 4-step generation at the editing guidance.
Step 0 is the zero-initialised adapters (the teacher's own DDIM jumps between the boundaries):
a trained model must beat it. Each option is a list of ``--set`` overrides on top of --config;
"before" pins the settings the stage had before this comparison, so the table stays
reproducible when defaults move. Last line: {"<option>": {"<step>": {"psnr": mean over seeds,
"mse": ..., "caption_accuracy": ..., "inplace_success": ..., "shape_iou": ..., "decoder_error": [...],
"encoder_error": [...], "psnr_by_seed": [...]}, ...}, ...} (in place and shape IoU: prompt-switch colour edits at
the editing guidance, icd.evaluation.editing; decoder / encoder error: each segment's jump against the teacher's
ODE, icd.evaluation.ode_fidelity, decoder 999 -> 779 first, encoder 19 -> 259 first; the chain errors: all
four jumps of each, from the ODE's end).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

# The icd stage as it trained before this comparison (toy.yaml of toy base v2's landing).
BEFORE = ["method.preservation_clean_end=renoise", "model.lora_init=gaussian", "train.icd.lr=3.0e-4",
          "method.target_ema_decay=0", "method.reverse_guidance_scales=null"]
SAMPLER_CONVS = ("model.lora_targets=[to_q,to_k,to_v,to_out.0,proj_in,proj_out,ff.net.0.proj,ff.net.2,"
                 "conv1,conv2,conv_shortcut,time_emb_proj,conv]")
OPTIONS = {
    "preset": [],  # --config as it is: the defaults this comparison chose
    "before": BEFORE,
    "clean_jump": [*BEFORE, "method.preservation_clean_end=jump"],
    "unguided": [*BEFORE, "method.reverse_guidance_scales=[0]"],  # cfg_distill keeps its scales
    "lr_1e-4": [*BEFORE, "train.icd.lr=1.0e-4"],
    "lr_3e-5": [*BEFORE, "train.icd.lr=3.0e-5"],
    "default_init": [*BEFORE, "model.lora_init=default"],
    "sampler_convs": [*BEFORE, SAMPLER_CONVS],
    "ema": [*BEFORE, "method.target_ema_decay=0.95"],
    "no_preservation": [*BEFORE, "method.lambda_forward=0", "method.lambda_reverse=0"],
    "jump_unguided": [*BEFORE, "method.preservation_clean_end=jump", "method.reverse_guidance_scales=[0]"],
    "jump_mostly_unguided": [*BEFORE, "method.preservation_clean_end=jump",
                             "method.reverse_guidance_scales=[0,0,0,0,7]"],
    # hypotheses 5 and the EMA target, on top of the preset as it is now (the winner of the above)
    "preset_sampler_convs": [SAMPLER_CONVS],
    "preset_ema": ["method.target_ema_decay=0.95"],
    "preset_step_per_term": ["train.icd.step_per_term=true"],  # hypothesis 4: the official code's four steps
    # pure consistency distillation (the paper table's icd2/3/4 rows), and whether an EMA target holds it
    "preset_no_preservation": ["method.lambda_forward=0", "method.lambda_reverse=0"],
    "preset_no_preservation_ema": ["method.lambda_forward=0", "method.lambda_reverse=0",
                                   "method.target_ema_decay=0.95"],
    # the consistency distance in epsilon units: the decoder's first segment has ~3x its last one's gain
    "preset_no_preservation_eps": ["method.lambda_forward=0", "method.lambda_reverse=0",
                                   "method.consistency_space=eps"],
    "preset_eps": ["method.consistency_space=eps"],
    # both of the two that held pure CD nearest its start, together; and the same with the preservation losses
    "preset_no_preservation_eps_ema": ["method.lambda_forward=0", "method.lambda_reverse=0",
                                       "method.consistency_space=eps", "method.target_ema_decay=0.95"],
    "preset_eps_ema": ["method.consistency_space=eps", "method.target_ema_decay=0.95"],
}


def option_list(text: str) -> list[str]:
    names = [part for part in text.split(",") if part]
    unknown = [n for n in names if n not in OPTIONS and not n.startswith("set:")]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown options {unknown}; expected names from {sorted(OPTIONS)}")
    return names


def int_list(text: str) -> list[int]:
    try:
        return sorted({int(part) for part in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def shapes_set(bundle, seeds, batch: int = 256):
    """(images in [-1, 1], latents, captions) of the shapes images of ``seeds``."""
    import numpy as np
    import torch

    from icd.data.shapes import random_sample

    samples = [random_sample(int(seed)) for seed in seeds]
    images = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        latents = torch.cat([bundle.encode_images(images[i:i + batch]) for i in range(0, len(images), batch)])
    return images, latents, [s.caption for s in samples]


def encode_captions(bundle, captions, batch: int = 256):
    import torch

    return torch.cat([bundle.encode_prompts(captions[i:i + batch]) for i in range(0, len(captions), batch)])


def evaluate(bundle, config, images, captions) -> dict:
    import torch

    from icd.diffusion import samplers
    from icd.diffusion.boundaries import Boundaries
    from icd.evaluation.editing import editing_metrics
    from icd.evaluation.ode_fidelity import segment_errors
    from icd.evaluation.reconstruction import consistency_reconstructor, reconstruction_metrics
    from icd.evaluation.report import generation_metrics

    boundaries = Boundaries.from_config(config.method)
    bundle.unet.eval()
    try:
        with torch.no_grad():
            recon = reconstruction_metrics(bundle, images, captions, consistency_reconstructor(boundaries))

            def generate(prompts):
                return samplers.generate(bundle, prompts, boundaries, config.editing.guidance, config.editing.tau,
                                         generator=torch.Generator().manual_seed(0)).images
            generation = generation_metrics(generate, captions)

            def edit(batch, sources, targets):  # prompt switch at the editing guidance (8 NFE)
                return samplers.edit(bundle, sources, targets, boundaries, images=batch, guidance=config.editing.guidance,
                                     tau=config.editing.tau, generator=torch.Generator().manual_seed(0)).images
            edits = editing_metrics(edit, images, captions)
            latents = bundle.encode_images(images)
            context = bundle.encode_prompts(captions)
            noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
            ode = segment_errors(bundle, latents, context, boundaries, config.method.teacher_step, noise)
    finally:
        bundle.unet.train()
    return {"psnr": recon["psnr"], "mse": recon["mse"], **generation,
            "inplace_success": edits["inplace_success"], "shape_iou": edits["shape_iou"],
            "decoder_error": ode["decoder"], "encoder_error": ode["encoder"],
            "decoder_chain_error": ode["decoder_chain"], "encoder_chain_error": ode["encoder_chain"]}


class RanksInOneProcess:
    """The objective as ``ranks`` DDP workers see it, in one process: each rank takes its slice of the
    global batch with its own draws (`step_generator(seed, rank, step)`), and the mean of the ranks'
    losses gives DDP's averaged gradient. Isolates what splitting the batch over workers changes from
    the rest of the Ray Train path."""

    def __init__(self, objective, ranks: int, seed: int):
        self.objective, self.ranks, self.seed, self.generators = objective, ranks, seed, []

    def begin_step(self, step: int) -> None:
        """Each rank's draws of this step; a per-term step goes on drawing from them, as on a worker."""
        from icd.train.loop import step_generator

        self.generators = [step_generator(self.seed, rank, step) for rank in range(self.ranks)]

    def __call__(self, latents, hidden, generator=None, term=None) -> dict:
        outs = [self.objective(x, h, g, term=term)
                for x, h, g in zip(latents.chunk(self.ranks), hidden.chunk(self.ranks), self.generators)]
        return {key: sum(out[key] for out in outs) / self.ranks for key in outs[0]}


def train(stage: str, config, input_manifest, latents, hidden, checkpoints, on_checkpoint, say,
          ranks: int = 1) -> object:
    """Train ``stage`` for max(checkpoints) steps (on ``ranks`` emulated DDP ranks, `RanksInOneProcess`);
    ``on_checkpoint(step, model)`` at each checkpoint."""
    import torch

    from icd.train.loop import step_generator, train_step
    from icd.train.optimization import build_optimizer
    from icd.train.stages import build_stage_model

    stage_config = getattr(config.train, stage)
    torch.manual_seed(config.seed)
    model = build_stage_model(stage, config, input_manifest)
    trainable = model.trainable_parameters()
    optimizer, schedule = build_optimizer(trainable.values(), stage_config)
    order = torch.Generator().manual_seed(config.seed)
    batch, steps, start = stage_config.global_batch_size, max(checkpoints), time.time()
    terms = model.objective.term_names() if stage_config.step_per_term else None
    permutation, cursor = torch.randperm(len(latents), generator=order), 0
    if batch % ranks:
        raise ValueError(f"--ranks {ranks}: the global batch {batch} does not split evenly")
    objective = model.objective if ranks == 1 else RanksInOneProcess(model.objective, ranks, config.seed)
    for step in range(steps + 1):
        if step in checkpoints:
            on_checkpoint(step, model)
        if step == steps:
            break
        if cursor + batch > len(latents):
            permutation, cursor = torch.randperm(len(latents), generator=order), 0
        index = permutation[cursor:cursor + batch]
        cursor += batch
        if ranks > 1:
            objective.begin_step(step)
        out, _ = train_step(objective, latents[index], hidden[index], step_generator(config.seed, 0, step),
                            optimizer, trainable, stage_config.grad_clip, schedule, model.target, terms=terms)
        if (step + 1) % 20 == 0:
            losses = " ".join(f"{k} {v.item():.4f}" for k, v in out.items() if k != "loss")
            say(f"  {stage} step {step + 1}/{steps} ({(time.time() - start) / (step + 1):.2f} s/step) {losses}")
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="jobs/configs/toy.yaml")
    parser.add_argument("--options", type=option_list, default=list(OPTIONS),
                        help="option names (see OPTIONS), or set:KEY=VALUE;KEY=VALUE for an ad-hoc one")
    parser.add_argument("--seeds", type=int_list, default=[0, 1])
    parser.add_argument("--checkpoints", type=int_list, default=[0, 120, 480])
    parser.add_argument("--batch", type=int, default=32, help="icd global batch size")
    parser.add_argument("--cfg-steps", type=int, default=300)
    parser.add_argument("--train-count", type=int, default=4096)
    parser.add_argument("--eval-count", type=int, default=64)
    parser.add_argument("--work", default="/tmp/icd-ablation", help="cache of the data and the cfg_distill output")
    parser.add_argument("--cfg-distill", default=None,
                        help="start from this cfg_distill output (its directory or manifest, local or s3:// with the "
                             "stack's environment) instead of training one, e.g. a paper_table run's, to compare "
                             "this single-process icd stage with the Ray Train one from the same input")
    parser.add_argument("--ranks", type=int, default=1,
                        help="split each icd batch over this many emulated DDP ranks (each with its rank's draws)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pictures", default=None,
                        help="write the training preview grid (generation, input, reconstruction, edit) of the first "
                             "8 held-out images at every checkpoint to DIR/<option>-seed<seed>-step<step>.png")
    parser.add_argument("--cycle-steps", type=int, default=0,
                        help="then train cycle this many steps on each final icd model (row '<option>+cycle', "
                             "evaluated at 0, half and all of them; step 0 is its icd input)")
    args = parser.parse_args()

    import torch

    from icd.config import load_config
    from icd.train.stages import StagePaths, export_stage, make_manifest, read_stage_manifest, write_json

    torch.set_num_threads(args.threads)
    say = lambda text: print(text, flush=True)  # noqa: E731
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    # The preset as it was at the start: a run takes hours, and the file may be edited meanwhile.
    snapshot = work / f"config-{os.getpid()}.yaml"
    snapshot.write_text(Path(args.config).read_text())
    args.config = str(snapshot)
    base = load_config(args.config, [f"train.cfg_distill.steps={args.cfg_steps}"])

    data = shapes_data(base, args, work / f"data-{args.train_count}-{args.eval_count}.pt")

    paths = StagePaths.of(base, "cfg_distill", "ablation", str(work))
    cfg_manifest = read_stage_manifest(args.cfg_distill or paths.manifest)
    if cfg_manifest is None and args.cfg_distill:
        parser.error(f"--cfg-distill {args.cfg_distill}: no stage manifest there")
    if cfg_manifest is None:
        say(f"cfg_distill: training {args.cfg_steps} steps")
        model = train("cfg_distill", base, None, data["latents"], data["hidden"], [args.cfg_steps],
                      lambda step, model: None, say)
        export_stage(model, paths.output)
        cfg_manifest = make_manifest(paths, base, None, args.cfg_steps, [])
        write_json(paths.manifest, cfg_manifest)

    table: dict[str, dict[str, list[dict]]] = {}
    for name in args.options:
        sets = OPTIONS[name] if name in OPTIONS else name.removeprefix("set:").split(";")
        for seed in args.seeds:
            config = load_config(args.config, [*sets, f"seed={seed}", f"train.icd.global_batch_size={args.batch}",
                                               f"train.icd.steps={max(args.checkpoints)}"])
            say(f"== {name} seed {seed}: {' '.join(sets)}")

            def on_checkpoint(step, model, name=name, config=config, seed=seed):
                result = evaluate(model.bundle, config, data["eval_images"], data["eval_captions"])
                table.setdefault(name, {}).setdefault(str(step), []).append(result)
                if args.pictures:
                    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
                    write_picture(Path(args.pictures) / f"{safe}-seed{seed}-step{step}.png", model.bundle, config,
                                  data["eval_images"][:8], data["eval_captions"][:8])
                say(f"{name:16s} seed {seed} step {step:4d}: psnr {result['psnr']:.2f} dB  mse {result['mse']:.4f}  "
                    f"caption {result['caption_accuracy']:.3f}  shape {result['shape_accuracy']:.3f}  "
                    f"in place {result['inplace_success']:.3f}  shape IoU {result['shape_iou']:.3f}  "
                    f"ODE error decoder {' '.join(f'{e:.4f}' for e in result['decoder_error'])}  "
                    f"encoder {' '.join(f'{e:.4f}' for e in result['encoder_error'])}  "
                    f"chains: decoder {result['decoder_chain_error']:.4f} encoder {result['encoder_chain_error']:.4f}")

            model = train("icd", config, cfg_manifest, data["latents"], data["hidden"], args.checkpoints,
                          on_checkpoint, say, ranks=args.ranks)
            if args.cycle_steps:
                config = load_config(args.config, [*sets, f"seed={seed}", f"train.icd.global_batch_size={args.batch}",
                                                   f"train.icd.steps={max(args.checkpoints)}",
                                                   f"train.cycle.steps={args.cycle_steps}"])
                paths = StagePaths.of(config, "icd", f"ablation-{name}", str(work))
                export_stage(model, paths.output)
                icd_manifest = make_manifest(paths, config, cfg_manifest, max(args.checkpoints), [])
                write_json(paths.manifest, icd_manifest)

                def on_cycle(step, model, name=f"{name}+cycle", config=config, seed=seed):
                    on_checkpoint(step, model, name, config, seed)
                train("cycle", config, icd_manifest, data["latents"], data["hidden"],
                      [0, args.cycle_steps // 2, args.cycle_steps], on_cycle, say)
    summary = {name: {step: {"psnr": round(sum(r["psnr"] for r in rows) / len(rows), 2),
                             "mse": round(sum(r["mse"] for r in rows) / len(rows), 4),
                             **{k: round(sum(r[k] for r in rows) / len(rows), 3)
                                for k in ("caption_accuracy", "inplace_success", "shape_iou", "decoder_chain_error",
                                          "encoder_chain_error")},
                             **{k: [round(sum(r[k][i] for r in rows) / len(rows), 4) for i in range(len(rows[0][k]))]
                                for k in ("decoder_error", "encoder_error")},
                             "psnr_by_seed": [round(r["psnr"], 2) for r in rows]}
                      for step, rows in steps.items()}
               for name, steps in table.items()}
    print(json.dumps(summary))


def write_picture(path: Path, bundle, config, images, captions) -> None:
    """The training preview grid of ``images`` (icd.train.previews) as a PNG."""
    import torch
    from PIL import Image

    from icd.diffusion.boundaries import Boundaries
    from icd.train.previews import preview_grid

    bundle.unet.eval()
    try:
        with torch.no_grad():
            grid = preview_grid("icd", bundle, Boundaries.from_config(config.method), bundle.encode_images(images),
                                captions, config.editing.guidance, config.editing.tau)
    finally:
        bundle.unet.train()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)


def shapes_data(config, args, cache: Path) -> dict:
    """Training latents and caption states, held-out images and captions; cached in ``cache``."""
    import torch

    from icd.models.loading import load_bundle

    if cache.exists():
        return torch.load(cache, weights_only=True)  # tensors, strings and lists only
    eval_seed_offset = 1_500_000_000  # jobs/make_shards.py's held-out seeds
    bundle = load_bundle(config.model.base)
    _, latents, captions = shapes_set(bundle, range(args.train_count))
    eval_images, _, eval_captions = shapes_set(bundle, range(eval_seed_offset, eval_seed_offset + args.eval_count))
    data = {"latents": latents, "hidden": encode_captions(bundle, captions), "eval_images": eval_images,
            "eval_captions": eval_captions}
    torch.save(data, cache)
    return data


if __name__ == "__main__":
    main()
