"""Evaluate a trained stage on the held-out split and keep the result next to its output.

``<output>/evaluation.json`` holds the rows (the stage's model, and with ``teacher=True`` the
DDIM-50 teacher row too); an evaluation that exists for the same eval settings is reused.
"""

from __future__ import annotations

import hashlib
import json

from icd.config import Config
from icd.storage import S3Settings, read_json

EVALUATION = "evaluation.json"
# Bumped when a metric's definition changes, so that older evaluations are recomputed rather
# than reused and registry versions measured differently are not compared with each other.
# 2: ``psnr`` is the mean of per-image PSNRs (1: the PSNR of the set's MSE).
# 3: edits get ``inplace_success`` and ``shape_iou`` (the renderer's coverage mask read back;
#    it replaces ``mask_iou``), generations ``shape_accuracy``.
METRICS_VERSION = 3


def evaluation_key(config: Config, eval_count: int, teacher: bool) -> str:
    blob = json.dumps([config.data.eval_dataset, eval_count, teacher, config.editing.model_dump(mode="json"),
                       config.method.lpips_pretrained_backbone, config.seed, METRICS_VERSION], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def evaluate_stage(config: Config, manifest: dict, eval_count: int = 128, teacher: bool = False,
                   settings: S3Settings | None = None) -> dict:
    """{"rows": {name: metrics}, "lpips": metric name, "key": ...}; computed once per (model, eval settings)."""
    import torch

    from icd.diffusion.boundaries import Boundaries
    from icd.evaluation.reconstruction import load_eval_images
    from icd.evaluation.report import evaluate
    from icd.losses.cycle import PatchLPIPS
    from icd.train.stages import load_stage_bundle, write_json

    settings = settings or S3Settings.from_config(config.storage)
    key = evaluation_key(config, eval_count, teacher)
    uri = f"{manifest['output']}/{EVALUATION}"
    existing = read_json(uri, settings)
    if existing is not None and existing.get("key") == key:
        return {**existing, "reused": True}
    if not config.data.eval_dataset:
        raise ValueError("data.eval_dataset is not set: name the held-out shard dataset to evaluate on")
    torch.manual_seed(config.seed)
    images, captions = load_eval_images(settings.uri(f"datasets/{config.data.eval_dataset}"), eval_count,
                                        config.model.resolution, settings)
    bundle = load_stage_bundle(manifest, settings=settings)
    lpips = PatchLPIPS(pretrained_backbone=config.method.lpips_pretrained_backbone)
    boundaries = Boundaries(tuple(manifest["boundaries"]["reverse"]), tuple(manifest["boundaries"]["forward"]))
    rows = {}
    if teacher:
        rows["ddim50"] = evaluate(bundle, "ddim", images, captions, config.editing, lpips, seed=config.seed)
    rows[manifest["stage"]] = evaluate(bundle, "consistency", images, captions, config.editing, lpips, boundaries,
                                       seed=config.seed)
    result = {"key": key, "model": manifest["output"], "lpips": lpips.name, "eval_count": len(images),
              "metrics_version": METRICS_VERSION, "rows": rows}
    write_json(uri, result, settings)
    return {**result, "reused": False}


def evaluate_pairs(config: Config, manifest: dict, pairs_csv: str, clip_model: str, dino_model: str,
                   settings: S3Settings | None = None) -> dict:
    """CLIP-T and DINOv2 similarity of the stage's edits on a CSV of (image, source, target) pairs."""
    from icd.editing.pipeline import EditPipeline
    from icd.evaluation.semantic import ClipTextSimilarity, DinoSimilarity, read_pairs, semantic_metrics

    settings = settings or S3Settings.from_config(config.storage)
    pipeline = EditPipeline.from_manifest(manifest, config.editing, config.model.resolution, settings=settings)

    def edit(images, sources, targets):
        return pipeline.edit(images, sources, targets, seed=config.seed).images

    return semantic_metrics(edit, read_pairs(pairs_csv), ClipTextSimilarity(model_id=clip_model),
                            DinoSimilarity(model_id=dino_model), settings=settings)
