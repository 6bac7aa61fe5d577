"""Miniature of the iCD paper's Table 2 and Inverse-and-Edit's Table 1 on the toy preset.

    eval "$(icd stack env)"
    python benchmarks/paper_table.py [--icd-steps 120] [--eval-count 128]

Trains, through the same stage runner as `jobs/train_stage.py` (Ray Train, 2 CPU workers,
outputs in the stack's S3): cfg_distill once; icd with 2 / 3 / 4 steps without preservation
losses, 4 steps + Lf, 4 steps + Lf + Lr; then cycle on top of the last. Finished stages are
reused, so a second run only evaluates. Evaluation: reconstruction of held-out shapes images
(shapes-eval) — latent MSE and pixel PSNR — for DDIM-50, DDIM-4 (the guidance-distilled
teacher), each iCD variant, the guided decode (w = 7) without and with dynamic CFG (tau = 0.7),
and cycle. Last line: {"<row>": {"mse": ..., "psnr": ...}, ...}.
"""

from __future__ import annotations

import argparse
import json
import time

ROWS = ("ddim50", "ddim4", "icd2", "icd3", "icd4", "icd4_lf", "icd4_lf_lr", "guided", "guided_dcfg", "cycle")
NO_PRESERVATION = ["method.lambda_forward=0", "method.lambda_reverse=0"]
VARIANTS = {
    "icd2": ["method.reverse_timesteps=[999,499]", "method.forward_timesteps=[19,499]", *NO_PRESERVATION],
    "icd3": ["method.reverse_timesteps=[999,699,339]", "method.forward_timesteps=[19,339,699]", *NO_PRESERVATION],
    "icd4": NO_PRESERVATION,
    "icd4_lf": ["method.lambda_reverse=0"],
    "icd4_lf_lr": [],
}


def variant_configs(args) -> dict:
    """The resolved config of each variant (the stage identities follow from them)."""
    from icd.config import load_config

    common = [f"train.cfg_distill.steps={args.cfg_steps}", f"train.icd.steps={args.icd_steps}",
              f"train.icd.global_batch_size={args.icd_batch}", f"train.cycle.steps={args.cycle_steps}",
              f"train.cycle.global_batch_size={args.cycle_batch}"]
    return {name: load_config(args.config, common + sets) for name, sets in VARIANTS.items()}


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="jobs/configs/toy.yaml")
    parser.add_argument("--run", default="paper-table")
    parser.add_argument("--cfg-steps", type=int, default=300)
    parser.add_argument("--icd-steps", type=int, default=120)
    parser.add_argument("--icd-batch", type=int, default=32)
    parser.add_argument("--cycle-steps", type=int, default=60)
    parser.add_argument("--cycle-batch", type=int, default=8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_training_arguments(parser)
    parser.add_argument("--eval-count", type=int, default=128)
    parser.add_argument("--tau", type=float, default=0.7, help="dynamic CFG for the guided row (inversion tables: 0.7)")
    args = parser.parse_args()

    import ray
    import torch

    from icd.diffusion.boundaries import Boundaries
    from icd.evaluation.reconstruction import (consistency_reconstructor, ddim_reconstructor, load_eval_images,
                                               reconstruction_metrics)
    from icd.storage import S3Settings
    from icd.train.runner import run_stage
    from icd.train.stages import load_stage_bundle

    configs = variant_configs(args)
    ray.init(address="local", num_cpus=2, object_store_memory=512 * 1024 * 1024, include_dashboard=False,
             log_to_driver=False)
    start = time.time()
    manifests = {}
    for name in VARIANTS:
        run_stage(configs[name], "cfg_distill", run=args.run)
        manifests[name] = run_stage(configs[name], "icd", run=args.run)
        print(f"[{time.time() - start:.0f}s] {name} trained", flush=True)
    manifests["cycle"] = run_stage(configs["icd4_lf_lr"], "cycle", run=args.run)
    print(f"[{time.time() - start:.0f}s] cycle trained", flush=True)
    ray.shutdown()

    torch.set_num_threads(2)
    config = configs["icd4"]
    settings = S3Settings.from_config(config.storage)
    images, captions = load_eval_images(settings.uri(f"datasets/{config.data.eval_dataset}"), args.eval_count,
                                        config.model.resolution, settings)
    table = {}

    def evaluate(row: str, manifest: dict, reconstructor) -> None:
        bundle = load_stage_bundle(manifest, settings=settings)
        table[row] = reconstruction_metrics(bundle, images, captions, reconstructor)
        print(f"{row:12s} mse {table[row]['mse']:.4f}  psnr {table[row]['psnr']:.2f} dB  nfe {table[row]['nfe']}",
              flush=True)

    final = manifests["icd4_lf_lr"]
    evaluate("ddim50", final, ddim_reconstructor(50))
    evaluate("ddim4", final, ddim_reconstructor(4))
    for name in VARIANTS:
        evaluate(name, manifests[name], consistency_reconstructor(Boundaries.from_config(configs[name].method)))
    default = Boundaries.from_config(configs["icd4_lf_lr"].method)
    evaluate("guided", final, consistency_reconstructor(default, guidance=7.0))
    evaluate("guided_dcfg", final, consistency_reconstructor(default, guidance=7.0, tau=args.tau))
    evaluate("cycle", manifests["cycle"], consistency_reconstructor(default))
    log_to_mlflow(config, table, vars(args))
    print(json.dumps({row: {"mse": round(table[row]["mse"], 5), "psnr": round(table[row]["psnr"], 2)}
                      for row in ROWS}))


def log_to_mlflow(config, table: dict, params: dict) -> None:
    """The table as CSV in an `icd-benchmarks` run, when a tracking server is configured."""
    import os

    if not os.environ.get("MLFLOW_TRACKING_URI"):
        return
    import mlflow

    mlflow.set_experiment("icd-benchmarks")
    with mlflow.start_run(run_name="paper_table"):
        mlflow.log_params(params)
        lines = ["row,mse,psnr,nfe"] + [f"{r},{v['mse']:.6f},{v['psnr']:.3f},{v['nfe']}" for r, v in table.items()]
        mlflow.log_text("\n".join(lines) + "\n", "paper_table.csv")
        for row, values in table.items():
            mlflow.log_metrics({f"{row}_mse": values["mse"], f"{row}_psnr": values["psnr"]})


if __name__ == "__main__":
    main()
