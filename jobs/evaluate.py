"""Evaluate a trained stage (icd or cycle) of a run on the held-out split; prints the table as JSON.

    ray job submit --working-dir . -- python jobs/evaluate.py --config jobs/configs/toy.yaml --stage cycle --teacher

Reconstruction (latent MSE, PSNR, LPIPS), editing on the shapes world (edit success,
background PSNR, mask IoU) and generation caption accuracy; with --teacher also the DDIM-50
row. The result is stored next to the stage's output and reused. In production, --pairs-csv
edits real photos and reports CLIP-T and DINOv2 similarity.
"""

from __future__ import annotations

import argparse
import json

from icd.config import load_config
from icd.evaluation.job import evaluate_pairs, evaluate_stage
from icd.evaluation.semantic import CLIP_MODEL, DINO_MODEL
from icd.train.stages import StagePaths, read_stage_manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--stage", choices=("icd", "cycle"), default="cycle")
    parser.add_argument("--run", help="run name (default: <preset>-<hash>)")
    parser.add_argument("--teacher", action="store_true", help="add the DDIM-50 teacher row")
    parser.add_argument("--eval-count", type=int, default=128)
    parser.add_argument("--pairs-csv", help="production: CSV of image,source_prompt,target_prompt (COCO / PIE-Bench "
                                            "style); adds CLIP-T and DINOv2 similarity instead of the shapes metrics")
    parser.add_argument("--clip-model", default=CLIP_MODEL, help="hub id or local directory")
    parser.add_argument("--dino-model", default=DINO_MODEL, help="hub id or local directory")
    args = parser.parse_args()

    config = load_config(args.config, args.set)
    paths = StagePaths.of(config, args.stage, args.run)
    manifest = read_stage_manifest(paths.manifest)
    if manifest is None:
        raise SystemExit(f"no finished {args.stage} output at {paths.output}; train it first (jobs/train_stage.py)")
    if args.pairs_csv:
        print(json.dumps(evaluate_pairs(config, manifest, args.pairs_csv, args.clip_model, args.dino_model)))
        return
    print(json.dumps(evaluate_stage(config, manifest, args.eval_count, args.teacher)))


if __name__ == "__main__":
    main()
