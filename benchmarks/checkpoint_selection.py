"""Exporting the last step against the best checkpoint on the validation split, on the paper table's runs.

    eval "$(icd stack env)"
    python benchmarks/checkpoint_selection.py --seeds 1 [--eval-count 128] [--validation-count 64]

Trains nothing: for each trained row of `benchmarks/paper_table.py` (same arguments, same seeds;
the runs must exist in the stack's S3) it scores every checkpoint the run kept on the validation
split (`data.validation_dataset`, which `train.<stage>.export: best_validation` chooses by) and
on the table's held-out images (`data.eval_dataset`, the first --eval-count, which the table
reports), and prints what each row would report with each export: `last` (the default), `best`
(the checkpoint with the highest validation PSNR) and `oracle` (the highest held-out PSNR, which no
rule can know). Selection does not change training, so this is the exact A/B of the two exports
over the kept checkpoints (a run that exports its best also scores the checkpoints Ray Train
deleted; here only `keep_checkpoints` remain). Last line:
{"<row>": {"last": ..., "best": ..., "oracle": ..., "by_seed": {...}}, ...} in held-out PSNR dB.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

ROWS = ("icd2", "icd3", "icd4", "icd4_lf", "icd4_lf_lr", "cycle")
# The runs this compares exported their last step (how the table trained before toy.yaml chose the best).
LAST = ("train.icd.export=last", "train.cycle.export=last")


def paper_table():
    spec = importlib.util.spec_from_file_location("paper_table", Path(__file__).with_name("paper_table.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def choose(validation: dict[int, float]) -> int:
    """The step with the highest validation PSNR (a tie keeps the earlier), as the training loop chooses."""
    return max(sorted(validation), key=lambda step: (validation[step], -step))


def main() -> None:
    table = paper_table()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    table.add_training_arguments(parser)
    parser.add_argument("--seeds", type=table.seed_list, default=[0, 1, 2])
    parser.add_argument("--eval-count", type=int, default=128)
    parser.add_argument("--validation-count", type=int, default=64)
    parser.add_argument("--validation-dataset", default="shapes-val")
    args = parser.parse_args()

    import torch

    from icd.diffusion.boundaries import Boundaries
    from icd.evaluation.reconstruction import consistency_reconstructor, load_eval_images, reconstruction_metrics
    from icd.evaluation.stage_check import kept_checkpoints, load_checkpoint_weights
    from icd.storage import S3Settings
    from icd.train.stages import StagePaths, load_stage_bundle, read_stage_manifest

    torch.set_num_threads(2)
    configs = {seed: table.variant_configs(args, seed, LAST) for seed in args.seeds}
    first = configs[args.seeds[0]]["icd4"]
    settings = S3Settings.from_config(first.storage)
    splits = {"validation": load_eval_images(settings.uri(f"datasets/{args.validation_dataset}"),
                                             args.validation_count, first.model.resolution, settings),
              "eval": load_eval_images(settings.uri(f"datasets/{first.data.eval_dataset}"), args.eval_count,
                                       first.model.resolution, settings)}
    results = {row: {} for row in ROWS}
    for seed in args.seeds:
        for row in ROWS:
            config = configs[seed]["icd4_lf_lr" if row == "cycle" else row]
            stage = "cycle" if row == "cycle" else "icd"
            paths = StagePaths.of(config, stage, args.run, settings=settings)
            manifest = read_stage_manifest(paths.manifest, settings)
            if manifest is None:
                raise SystemExit(f"seed {seed} {row}: no {stage} output at {paths.output}; run "
                                 f"benchmarks/paper_table.py --seeds {seed} first (same arguments)")
            bundle = load_stage_bundle(manifest, settings=settings)
            reconstructor = consistency_reconstructor(Boundaries.from_config(config.method), seed=config.seed)
            scores = {"validation": {}, "eval": {}}
            for step, uri in kept_checkpoints(paths.storage_path, paths.trainer_name, settings).items():
                load_checkpoint_weights(bundle, uri, settings)
                for split, (images, captions) in splits.items():
                    scores[split][step] = reconstruction_metrics(bundle, images, captions, reconstructor)["psnr"]
            last, best = max(scores["eval"]), choose(scores["validation"])
            results[row][seed] = {"last": scores["eval"][last], "best": scores["eval"][best], "best_step": best,
                                  "oracle": max(scores["eval"].values()), "scores": scores}
            print(f"seed {seed}  {row:10s} " + ", ".join(
                f"{step}: val {scores['validation'][step]:.2f} / eval {scores['eval'][step]:.2f}"
                for step in scores["eval"]) + f"  -> last {scores['eval'][last]:.2f}, best (step {best}) "
                f"{scores['eval'][best]:.2f}", flush=True)
    summary = {}
    for row, by_seed in results.items():
        summary[row] = {key: round(sum(r[key] for r in by_seed.values()) / len(by_seed), 2)
                        for key in ("last", "best", "oracle")}
        summary[row]["by_seed"] = {seed: {k: (round(v, 2) if isinstance(v, float) else v) for k, v in r.items()
                                          if k != "scores"} for seed, r in by_seed.items()}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
