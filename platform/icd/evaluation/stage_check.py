"""The DAG's no-regression check of one finished stage: load its input and output, measure, decide.

``<output>/no_regression.json`` keeps the measurements (before, after, and the PSNR of every
checkpoint the run kept, the curve), reused while the check's settings are the same; the gates
are applied anew each time, so relaxing ``tracking.stage_gates`` needs no re-measurement. The
measurements go to the stage's MLflow run: ``no_regression.{before,after}.<metric>`` and the
curve as ``no_regression.psnr`` over training steps (step 0 is the stage's input).
"""

from __future__ import annotations

import hashlib
import json
import re

import torch

from icd.config import Config
from icd.evaluation.regression import GateResult, check_gates, stage_quality
from icd.storage import S3Settings, filesystem_for, read_json

RESULT = "no_regression.json"
VERSION = 2  # bumped when a measurement changes definition (2: per-image outcomes of fractions kept)
CHECKPOINT_DIR = re.compile(r"^step-(\d+)$")


def check_key(config: Config, stage: str) -> str:
    blob = json.dumps([stage, config.data.eval_dataset, config.tracking.stage_check_count, config.seed,
                       config.editing.model_dump(mode="json"), config.method.guidance_scales, VERSION], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def input_bundle(stage: str, config: Config, input_manifest: dict | None, settings: S3Settings | None):
    """The model a stage started from: the base teacher (cfg_distill), its input with zero-initialised
    adapters (icd: exactly what the stage's first step sees), or the icd output (cycle)."""
    from icd.models.adapters import add_adapters_from_config
    from icd.models.loading import load_bundle
    from icd.train.stages import load_stage_bundle

    if stage == "cfg_distill":
        return load_bundle(config.model.base, revision=config.model.revision, vae=config.model.vae)
    bundle = load_stage_bundle(input_manifest, settings=settings)
    if stage == "icd":
        torch.manual_seed(config.seed)
        add_adapters_from_config(bundle.unet, config.model)
        bundle.unet.requires_grad_(False)
    return bundle


def kept_checkpoints(storage_path: str, trainer_name: str, settings: S3Settings | None) -> dict[int, str]:
    """{step: URI} of the Ray Train checkpoints a stage's run kept (``step-0000030`` directories)."""
    from pyarrow import fs as pafs

    fs, path = filesystem_for(f"{storage_path}/{trainer_name}", settings)
    try:
        entries = fs.get_file_info(pafs.FileSelector(path))
    except FileNotFoundError:
        return {}
    found = {}
    for entry in entries:
        match = CHECKPOINT_DIR.match(entry.base_name)
        if entry.type == pafs.FileType.Directory and match:
            found[int(match.group(1))] = f"{storage_path}/{trainer_name}/{entry.base_name}"
    return dict(sorted(found.items()))


def load_checkpoint_weights(bundle, uri: str, settings: S3Settings | None) -> None:
    """Put a checkpoint's trainable weights (adapters) into ``bundle``'s UNet; the names must match."""
    from safetensors.torch import load

    fs, path = filesystem_for(f"{uri}/trainable.safetensors", settings)
    with fs.open_input_stream(path) as f:
        weights = load(f.read())
    params = dict(bundle.unet.named_parameters())
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise ValueError(f"checkpoint {uri} does not match the stage's model: unexpected {unknown[:3]}")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def measure_stage(config: Config, stage: str, manifest: dict, input_manifest: dict | None,
                  settings: S3Settings | None = None, checkpoint_root: str | None = None) -> dict:
    """{"key", "before", "after", "curve"}: the stage's input and output measured on held-out images."""
    from icd.diffusion.boundaries import Boundaries
    from icd.evaluation.reconstruction import load_eval_images
    from icd.train.stages import StagePaths, load_stage_bundle

    settings = settings or S3Settings.from_config(config.storage)
    if not config.data.eval_dataset:
        raise ValueError("data.eval_dataset is not set: the no-regression check needs held-out images")
    images, captions = load_eval_images(settings.uri(f"datasets/{config.data.eval_dataset}"),
                                        config.tracking.stage_check_count, config.model.resolution, settings)
    boundaries = Boundaries(tuple(manifest["boundaries"]["reverse"]), tuple(manifest["boundaries"]["forward"]))
    kwargs = {"boundaries": boundaries, "seed": config.seed}
    if stage == "cfg_distill":
        teacher = input_bundle(stage, config, None, settings)
        kwargs.update(teacher=teacher, guidance_scales=config.method.guidance_scales)
        before = stage_quality(stage, teacher, images, captions, config.editing, **kwargs)
    else:
        before = stage_quality(stage, input_bundle(stage, config, input_manifest, settings), images, captions,
                               config.editing, **kwargs)
    output = load_stage_bundle(manifest, settings=settings)
    after = stage_quality(stage, output, images, captions, config.editing, **kwargs)
    curve = {}
    if stage != "cfg_distill":
        from icd.evaluation.reconstruction import consistency_reconstructor, reconstruction_metrics

        paths = StagePaths.of(config, stage, manifest["run"], checkpoint_root, settings)
        # the exported step: the last, or the best checkpoint on the validation split (train.<stage>.export)
        exported = int(manifest.get("exported_step", manifest.get("steps", 0)))
        curve[0] = before["psnr"]
        for step, uri in kept_checkpoints(paths.storage_path, paths.trainer_name, settings).items():
            if step == exported:  # the exported output itself, measured above
                continue
            load_checkpoint_weights(output, uri, settings)
            curve[step] = reconstruction_metrics(output, images, captions,
                                                 consistency_reconstructor(boundaries, seed=config.seed))["psnr"]
        curve[exported] = after["psnr"]
    return {"key": check_key(config, stage), "stage": stage, "eval_count": len(images), "before": before,
            "after": after, "curve": {str(k): v for k, v in sorted(curve.items())}}


def check_stage(config: Config, stage: str, manifest: dict, input_manifest: dict | None,
                settings: S3Settings | None = None, checkpoint_root: str | None = None,
                log_to_mlflow: bool = True) -> tuple[dict, list[GateResult]]:
    """Measure (or reuse the measurement of) one stage output and apply ``tracking.stage_gates`` to it."""
    from icd.train.stages import write_json

    settings = settings or S3Settings.from_config(config.storage)
    uri = f"{manifest['output']}/{RESULT}"
    measured = read_json(uri, settings)
    if measured is None or measured.get("key") != check_key(config, stage):
        measured = measure_stage(config, stage, manifest, input_manifest, settings, checkpoint_root)
        write_json(uri, measured, settings)
        if log_to_mlflow and manifest.get("mlflow_run_id"):
            log_measurement(config, manifest["mlflow_run_id"], measured)
    return measured, check_gates(stage, measured["before"], measured["after"], config.tracking.stage_gates)


def log_measurement(config: Config, run_id: str, measured: dict) -> None:
    import mlflow

    from icd.train.tracking import tracking_uri

    client = mlflow.MlflowClient(tracking_uri(config))
    for side in ("before", "after"):
        for metric, value in measured[side].items():
            if not isinstance(value, (int, float)):  # the per-image outcomes stay in no_regression.json
                continue
            client.log_metric(run_id, f"no_regression.{side}.{metric}", float(value))
    for step, value in measured["curve"].items():
        client.log_metric(run_id, "no_regression.psnr", float(value), step=int(step))
