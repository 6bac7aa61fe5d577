"""Run one stage as a Ray Train ``TorchTrainer`` (the driver side of a stage job).

A finished stage (its manifest exists for the same identity) is returned as is and
trains nothing. Otherwise the trainer runs under ``RunConfig(name=<stage>-<identity>,
storage_path=<root>/checkpoints/<run>)``, so a job submitted again resumes from the latest
checkpoint, and ``FailureConfig`` restarts the worker group from it when a worker dies. A stage
that exports its best checkpoint (``train.<stage>.export: best_validation``) has Ray Train keep
checkpoints by their ``validation_psnr``; the manifest names the step it exported.
"""

from __future__ import annotations

import ray
import ray.train
from ray.train.torch import TorchTrainer

from icd.config import Config
from icd.data.feeding import ingest_config
from icd.storage import S3Settings, filesystem_for, is_s3_uri, picklable_s3_filesystem
from icd.train import tracking
from icd.train.loop import NUMERIC_COLUMNS, train_loop_per_worker
from icd.train.resources import wait_for_resources
from icd.train.stage_lock import stage_lock
from icd.train.stages import PREVIOUS, StagePaths, check_stage, make_manifest, read_stage_manifest, write_json
from icd.train.validation import SCORE, selects_best

PREVIEW_SAMPLES = 8


def training_dataset(config: Config, settings: S3Settings) -> tuple[ray.data.Dataset, str]:
    """The training data: the latent cache (built first if missing) or the raw shards, and which it is."""
    if config.data.use_latent_cache:
        from icd.data.latent_cache import ensure_latent_cache, read_latent_cache

        cache = ensure_latent_cache(config, settings=settings)["cache"]
        return read_latent_cache(cache, settings), "latents"
    from icd.data.latent_cache import dataset_uri
    from icd.data.reader import PreprocessOptions, preprocess_shards

    return preprocess_shards(dataset_uri(config, settings=settings), PreprocessOptions.from_config(config), settings,
                             shuffle_seed=config.data.shuffle_seed, cpus_per_actor=0.5), "raw"


def preview_batch(dataset: ray.data.Dataset, kind: str) -> dict:
    rows = dataset.take_batch(PREVIEW_SAMPLES, batch_format="numpy")
    return {"captions": [str(c) for c in rows["caption"]], **{c: rows[c] for c in NUMERIC_COLUMNS[kind]}}


def run_stage(config: Config, stage: str, run: str | None = None, root: str | None = None,
              settings: S3Settings | None = None, parent_run_id: str | None = None,
              max_failures: int = 3, failure_drill: dict | None = None, say=print) -> dict:
    """Train ``stage`` unless its output exists; returns its manifest (``reused`` says which)."""
    check_stage(stage)
    settings = settings or S3Settings.from_config(config.storage)
    paths = StagePaths.of(config, stage, run, root, settings)
    finished = read_stage_manifest(paths.manifest, settings)
    if finished is not None:
        say(f"{stage}: already trained ({paths.output}); nothing to do")
        return {**finished, "reused": True}
    # Two identical submissions at once: one trains, the other waits here and then reuses its output.
    with stage_lock(paths.output, say=say) as waited:
        finished = read_stage_manifest(paths.manifest, settings) if waited else None
        if finished is not None:
            say(f"{stage}: trained meanwhile by another job ({paths.output}); reusing it")
            return {**finished, "reused": True}
        return _train(config, stage, paths, root, settings, parent_run_id, max_failures, failure_drill, say)


def _train(config: Config, stage: str, paths: StagePaths, root: str | None, settings: S3Settings,
           parent_run_id: str | None, max_failures: int, failure_drill: dict | None, say) -> dict:
    wait_for_resources(stage, config.scaling, config.scaling.resources_timeout_s, say=say)

    input_manifest = None
    if PREVIOUS[stage]:
        previous = StagePaths.of(config, PREVIOUS[stage], paths.run, root, settings)
        input_manifest = read_stage_manifest(previous.manifest, settings)
        if input_manifest is None:
            raise FileNotFoundError(f"stage {stage} needs {PREVIOUS[stage]}'s output at {previous.output}; "
                                    f"run --stage {PREVIOUS[stage]} first (same config and run name)")
    dataset, kind = training_dataset(config, settings)
    preview = preview_batch(dataset, kind)
    dataset = dataset.select_columns(NUMERIC_COLUMNS[kind])

    mlflow = None
    if config.tracking.tracking_uri or tracking_configured():
        run_id = tracking.start_stage_run(config, stage, paths.identity, paths.run,
                                          input_manifest and input_manifest["output"], parent_run_id)
        mlflow = {"uri": tracking.tracking_uri(config), "run_id": run_id}
    say(f"{stage}: training {getattr(config.train, stage).steps} steps on {config.scaling.num_workers} "
        f"worker(s); checkpoints under {paths.storage_path}/{paths.trainer_name}")

    fs, storage_path = filesystem_for(paths.storage_path, settings)
    if is_s3_uri(paths.storage_path):  # Ray pickles it to the controller and workers: keep its retries
        fs = picklable_s3_filesystem(settings or S3Settings.from_env())
    scaling = config.scaling
    # By score, Ray keeps the best `keep_checkpoints` and the latest (to resume from).
    score = {"checkpoint_score_attribute": SCORE, "checkpoint_score_order": "max"} if selects_best(config, stage) else {}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.to_dict(), "stage": stage, "input_manifest": input_manifest,
                           "output_uri": paths.output, "mlflow": mlflow,
                           "preview": preview, "failure_drill": failure_drill},
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": scaling.cpus_per_worker,
                                  **({"GPU": scaling.gpus_per_worker} if scaling.use_gpu else {}),
                                  **scaling.custom_resources_per_worker}),
        run_config=ray.train.RunConfig(
            name=paths.trainer_name, storage_path=storage_path, storage_filesystem=fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=getattr(config.train, stage).keep_checkpoints,
                                                         **score),
            failure_config=ray.train.FailureConfig(max_failures=max_failures)),
        datasets={"train": dataset},
        dataset_config=ingest_config(config.data.preserve_order),
    )
    try:
        result = trainer.fit()
    except Exception:
        if mlflow:
            tracking.mark_failed(config, mlflow["run_id"])
        raise
    state = result.metrics or {}
    manifest = make_manifest(paths, config, input_manifest, int(state.get("step", 0)),
                             list(state.get("resumed_from", [])))
    manifest["samples_per_s"] = round(float(state.get("samples_per_s", 0.0)), 3)
    if selects_best(config, stage) and state.get("best_step") is not None:
        manifest["exported_step"] = int(state["best_step"])
        manifest[SCORE] = round(float(state["best_validation_psnr"]), 3)
    if mlflow:
        manifest["mlflow_run_id"] = mlflow["run_id"]
    write_json(paths.manifest, manifest, settings)  # last: a manifest means a complete output
    if mlflow:
        tracking.finish_stage_run(config, mlflow["run_id"], manifest)
    say(f"{stage}: done, output {paths.output}")
    return {**manifest, "reused": False}


def tracking_configured() -> bool:
    import os

    return bool(os.environ.get("MLFLOW_TRACKING_URI"))
