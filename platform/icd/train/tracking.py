"""MLflow for the training stages: the driver owns the run, rank 0 logs into it (`metrics_logger`).

The driver creates (or, after a crash, finds again) one run per stage, tagged with the
stage, its identity and its input, and logs the resolved config. Train workers never start
runs: rank 0 logs metrics and image grids into that run by id, so a restarted worker group
keeps writing to the same run.
"""

from __future__ import annotations

import os


from icd.config import Config

TAG_STAGE, TAG_IDENTITY, TAG_RUN, TAG_CONFIG = "icd.stage", "icd.stage_identity", "icd.run", "icd.config_hash"


def tracking_uri(config: Config) -> str:
    uri = config.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ValueError("no MLflow tracking URI: set tracking.tracking_uri or export MLFLOW_TRACKING_URI "
                         "(for the local stack: eval \"$(icd stack env)\")")
    return uri


def _flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = str(value)[:500]
    return flat


# MLflow 3's UI opens an experiment on its runs, not its GenAI traces view, when it has this tag.
EXPERIMENT_KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"


def training_experiment(client, name: str) -> str:
    """The id of experiment ``name`` (created if missing), marked as a model-training experiment."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: TRAINING_KIND})
    if EXPERIMENT_KIND_TAG not in experiment.tags:  # made before the tag, or by mlflow.set_experiment
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    return experiment.experiment_id


def start_stage_run(config: Config, stage: str, identity: str, run: str, input_uri: str | None,
                    parent_run_id: str | None = None) -> str:
    """The MLflow run id of this stage: an unfinished run of the same identity is continued, else a new one."""
    import mlflow
    from mlflow.entities import Param, RunTag

    client = mlflow.MlflowClient(tracking_uri(config))
    experiment_id = training_experiment(client, config.tracking.experiment)
    found = client.search_runs([experiment_id], filter_string=f"tags.`{TAG_IDENTITY}` = '{identity}' and "
                               f"tags.`{TAG_RUN}` = '{run}'", order_by=["attributes.start_time DESC"], max_results=1)
    if found and found[0].info.status != "FINISHED":
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    tags = {TAG_STAGE: stage, TAG_IDENTITY: identity, TAG_RUN: run, TAG_CONFIG: config.hash(),
            "icd.input": input_uri or config.model.base, "mlflow.runName": f"{stage}-{identity}"}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    created = client.create_run(experiment_id, tags=tags)
    run_id = created.info.run_id
    params = _flatten(config.to_dict())
    items = [Param(k, v) for k, v in params.items()]
    for lo in range(0, len(items), 100):
        client.log_batch(run_id, params=items[lo:lo + 100], tags=[RunTag("icd.params", "config")] if lo == 0 else [])
    client.log_text(run_id, config.to_yaml(), "config.yaml")
    return run_id


def finish_stage_run(config: Config, run_id: str, manifest: dict, status: str = "FINISHED") -> None:
    import json

    import mlflow

    client = mlflow.MlflowClient(tracking_uri(config))
    client.log_text(run_id, json.dumps(manifest, indent=1), "manifest.json")
    if "exported_step" in manifest:  # train.<stage>.export: best_validation chose a checkpoint
        client.set_tag(run_id, "icd.exported_step", str(manifest["exported_step"]))
    client.set_terminated(run_id, status=status)


def mark_failed(config: Config, run_id: str) -> None:
    """Leave the run FAILED; submitting the job again continues it (see `start_stage_run`)."""
    import mlflow

    mlflow.MlflowClient(tracking_uri(config)).set_terminated(run_id, status="FAILED")
