"""Editing modes on the shapes world: in-place success against preservation over each mode's main knob.

    eval "$(icd stack env)"
    python benchmarks/edit_modes.py [--run paper-table --stage cycle | --manifest s3://.../manifest.json]

Colour-swap edits of held-out shapes images (shapes-eval) with a trained model (by default
the newest `cycle` output of the paper-table run): `switch` over the guidance scale w,
`p2p` over the self-attention injection fraction, `guided` over a scale on the self-attention
energy weights. Writes the trade-off curve as CSV and PNG (and logs both to MLflow when a
tracking server is configured). Besides, at the defaults: each mode with the model's input stage
(``icd_<mode>``: the icd adapters that cycle fine-tuned, so cycle's effect shows), and the base
teacher editing with DDIM-50 and two-pass CFG (``teacher``: prompt switch, ``teacher_p2p``; 150
NFE). Last line: {"<mode>": {"inplace_success": ..., "shape_iou": ..., "background_psnr": ...,
"edit_success": ..., "nfe": ..., "ms_per_edit": ...}, ..., "teacher": {...}} (the metrics:
icd.evaluation.editing)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import torch

SWEEPS = {  # mode: (knob, values, default)
    "switch": ("guidance", [3.0, 5.0, 7.0, 11.0], 7.0),
    "p2p": ("self_fraction", [0.0, 0.3, 0.6, 1.0], 0.6),
    "guided": ("self_attention_scale", [0.0, 0.3, 1.0, 3.0, 10.0, 33.3], 1.0),  # x the config (toy: 600)
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="jobs/configs/toy.yaml")
    parser.add_argument("--manifest", help="a stage output's manifest.json (default: newest --stage of --run)")
    parser.add_argument("--run", default="paper-table")
    parser.add_argument("--stage", default="cycle")
    parser.add_argument("--eval-count", type=int, default=64)
    parser.add_argument("--out", default="benchmarks/results", help="where the CSV and PNG go")
    args = parser.parse_args()

    from icd.config import load_config
    from icd.diffusion.boundaries import Boundaries
    from icd.editing.guided import GuidedOptions
    from icd.editing.modes import edit
    from icd.editing.p2p import P2POptions
    from icd.evaluation.editing import EDIT_METRICS, editing_metrics
    from icd.evaluation.reconstruction import load_eval_images
    from icd.storage import S3Settings
    from icd.train.stages import latest_stage_manifest, load_stage_bundle, read_stage_manifest

    torch.set_num_threads(2)
    config = load_config(args.config)
    settings = S3Settings.from_config(config.storage)
    manifest = (read_stage_manifest(args.manifest, settings) if args.manifest
                else latest_stage_manifest(settings.uri(), args.run, args.stage, settings))
    if manifest is None:
        raise SystemExit(f"no trained {args.stage} output in run {args.run}: run benchmarks/paper_table.py first "
                         "or pass --manifest")
    bundle = load_stage_bundle(manifest, settings=settings)
    boundaries = Boundaries(tuple(manifest["boundaries"]["reverse"]), tuple(manifest["boundaries"]["forward"]))
    images, captions = load_eval_images(settings.uri(f"datasets/{config.data.eval_dataset}"), args.eval_count,
                                        config.model.resolution, settings)
    editing = config.editing
    base_guided = GuidedOptions.from_config(editing)
    rows = []
    for mode, (knob, values, default) in SWEEPS.items():
        for value in values:
            guidance, p2p, guided = editing.guidance, P2POptions.from_config(editing), base_guided
            if knob == "guidance":
                guidance = value
            elif knob == "self_fraction":
                p2p = dataclasses.replace(p2p, self_fraction=value)
            else:
                guided = dataclasses.replace(base_guided, self_attention_weights=tuple(
                    w * value for w in base_guided.self_attention_weights))
            nfe = {}

            def run(batch, sources, targets):
                out = edit(bundle, sources, targets, boundaries, mode=mode, images=batch, guidance=guidance,
                           tau=editing.tau, generator=torch.Generator().manual_seed(0), p2p=p2p, guided=guided)
                nfe["value"] = out.nfe
                return out.images

            metrics = editing_metrics(run, images, captions)
            rows.append({"mode": mode, "knob": knob, "value": value, "default": value == default, **metrics,
                         "nfe": nfe["value"]})
            print(f"{mode:7s} {knob}={value:<6} in place {metrics['inplace_success']:.3f}  shape IoU "
                  f"{metrics['shape_iou']:.3f}  background {metrics['background_psnr']:.2f} dB  edit success "
                  f"{metrics['edit_success']:.3f}  nfe {nfe['value']}  {metrics['ms_per_edit']:.1f} ms/edit", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out / "edit_modes.csv", out / "edit_modes.png"
    columns = ["mode", "knob", "value", "default", *EDIT_METRICS, "nfe", "ms_per_edit"]
    csv_path.write_text("\n".join([",".join(columns)] + [",".join(str(r[c]) for c in columns) for r in rows]) + "\n")
    plot(rows, png_path)
    defaults = {r["mode"]: {**{k: round(r[k], 3) for k in EDIT_METRICS}, "nfe": r["nfe"],
                            "ms_per_edit": round(r["ms_per_edit"], 1)} for r in rows if r["default"]}
    defaults.update(reference_rows(config, manifest, images, captions, settings))
    log_to_mlflow(csv_path, png_path, manifest, defaults)
    print(json.dumps(defaults))


def reference_rows(config, manifest: dict, images, captions, settings) -> dict[str, dict]:
    """Each mode at its default with the model's input stage (``icd_<mode>``), and the teacher's DDIM-50 edits."""
    from icd.editing.modes import edit
    from icd.editing.p2p import P2POptions
    from icd.editing.guided import GuidedOptions
    from icd.editing.teacher import ddim_edit
    from icd.evaluation.editing import EDIT_METRICS, editing_metrics
    from icd.diffusion.boundaries import Boundaries
    from icd.models.loading import load_bundle
    from icd.train.stages import load_stage_bundle, read_stage_manifest

    editing, rows = config.editing, {}

    def summarise(name, run):
        nfe = {}

        def timed(batch, sources, targets):
            out = run(batch, sources, targets)
            nfe["value"] = out.nfe
            return out.images
        metrics = editing_metrics(timed, images, captions)
        rows[name] = {**{k: round(metrics[k], 3) for k in EDIT_METRICS}, "nfe": nfe["value"],
                      "ms_per_edit": round(metrics["ms_per_edit"], 1)}
        print(f"{name:12s} " + "  ".join(f"{k} {v}" for k, v in rows[name].items()), flush=True)

    previous = read_stage_manifest(manifest["input"], settings) if manifest.get("input") else None
    if previous is not None and previous.get("adapters"):
        bundle = load_stage_bundle(previous, settings=settings)
        boundaries = Boundaries(tuple(previous["boundaries"]["reverse"]), tuple(previous["boundaries"]["forward"]))
        for mode in SWEEPS:
            summarise(f"{previous['stage']}_{mode}", lambda batch, sources, targets, mode=mode: edit(
                bundle, sources, targets, boundaries, mode=mode, images=batch, guidance=editing.guidance,
                tau=editing.tau, generator=torch.Generator().manual_seed(0), p2p=P2POptions.from_config(editing),
                guided=GuidedOptions.from_config(editing)))
    teacher = load_bundle(config.model.base)
    for name, mode in (("teacher", "switch"), ("teacher_p2p", "p2p")):
        summarise(name, lambda batch, sources, targets, mode=mode: ddim_edit(
            teacher, sources, targets, mode=mode, images=batch, num_steps=50, guidance=editing.guidance,
            tau=editing.tau, p2p=P2POptions.from_config(editing)))
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in SWEEPS:
        points = [r for r in rows if r["mode"] == mode]
        ax.plot([r["background_psnr"] for r in points], [r["inplace_success"] for r in points], marker="o", label=mode)
        for r in points:
            ax.annotate(f"{r['value']:g}", (r["background_psnr"], r["inplace_success"]), fontsize=7)
    ax.set_xlabel("background PSNR (dB), preservation")
    ax.set_ylabel("in-place success (colour swaps)")
    ax.set_title("Editing modes on the shapes world")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def log_to_mlflow(csv_path: Path, png_path: Path, manifest: dict, defaults: dict[str, dict]) -> None:
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        return
    import mlflow

    from icd.train.tracking import training_experiment

    mlflow.set_experiment(experiment_id=training_experiment(mlflow.MlflowClient(), "icd-benchmarks"))
    with mlflow.start_run(run_name="edit_modes"):
        mlflow.log_params({"model": manifest["output"], "stage": manifest["stage"]})
        mlflow.log_artifact(str(csv_path))
        mlflow.log_artifact(str(png_path))
        mlflow.log_metrics({f"{mode}.{k}": float(v) for mode, row in defaults.items() for k, v in row.items()})


if __name__ == "__main__":
    main()
