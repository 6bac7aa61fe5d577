"""The training DAG, in order:

    shards -> latents -> cfg_distill -> icd -> (evaluate_icd || cycle) -> evaluate_cycle -> register -> promote

Every step's output lives in object storage under an identity derived from the config, so a
step whose output exists is reused: a DAG submitted again after a crash resumes where it
stopped, and one submitted again after success trains nothing. MLflow gets one parent run
per DAG run and one child run per step that does work.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from icd.config import Config
from icd.storage import S3Settings, read_json

STEPS = ("shards", "latents", "cfg_distill", "icd", "evaluate_icd", "cycle", "evaluate_cycle", "register", "promote")
TRAINING = ("cfg_distill", "icd", "cycle")


class PipelineError(RuntimeError):
    """A step cannot run; the message says what is missing and how to provide it."""


@dataclass
class PlanItem:
    step: str
    action: str  # "run", "reuse" or "skip"
    detail: str = ""


def select_steps(stages: list[str] | None = None, from_stage: str | None = None) -> list[str]:
    """The steps to execute, in DAG order: a subset (``--stages``) and/or a suffix (``--from-stage``)."""
    for name in (*(stages or []), *([from_stage] if from_stage else [])):
        if name not in STEPS:
            raise PipelineError(f"unknown step {name!r}; expected one of {', '.join(STEPS)}")
    chosen = [s for s in STEPS if not stages or s in stages]
    if from_stage:
        chosen = [s for s in chosen if STEPS.index(s) >= STEPS.index(from_stage)]
    return chosen


class TrainingDAG:
    def __init__(self, config: Config, run: str | None = None, settings: S3Settings | None = None,
                 eval_count: int = 128, say=print):
        from icd.train.stages import default_run_name

        self.config, self.say, self.eval_count = config, say, eval_count
        self.settings = settings or S3Settings.from_config(config.storage)
        self.run = run or default_run_name(config)
        self.model_name = config.tracking.model_name(config.preset)

    # --- where things are ----------------------------------------------------------------

    def paths(self, stage: str):
        from icd.train.stages import StagePaths

        return StagePaths.of(self.config, stage, self.run, settings=self.settings)

    def manifest(self, stage: str) -> dict | None:
        from icd.train.stages import read_stage_manifest

        return read_stage_manifest(self.paths(stage).manifest, self.settings)

    def datasets(self) -> list[str]:
        """The shard datasets the pipeline reads: training, held-out, and validation when a stage exports its best."""
        from icd.train.validation import selects_best

        data = self.config.data
        names = [data.dataset, data.eval_dataset]
        if any(selects_best(self.config, stage) for stage in TRAINING):
            names.append(data.validation_dataset)
        return [n for n in names if n]

    def dataset_ready(self, name: str | None) -> bool:
        return bool(name) and read_json(self.settings.uri(f"datasets/{name}/_stats.json"), self.settings) is not None

    def plan(self) -> list[PlanItem]:
        """What each step would do now, without doing it."""
        from icd.data.latent_cache import cache_location, read_manifest
        from icd.evaluation.job import EVALUATION, evaluation_key

        items = []
        missing = [n for n in self.datasets() if not self.dataset_ready(n)]
        items.append(PlanItem("shards", "skip" if missing else "reuse",
                              f"missing {missing}: run jobs/make_shards.py" if missing else "datasets present"))
        cache = cache_location(self.config, settings=self.settings)
        items.append(PlanItem("latents", "reuse" if read_manifest(cache, self.settings) else "run", cache))
        for stage in TRAINING:
            paths = self.paths(stage)
            items.append(PlanItem(stage, "reuse" if self.manifest(stage) else "run", paths.output))
            if stage in ("icd", "cycle"):
                evaluation = read_json(f"{paths.output}/{EVALUATION}", self.settings)
                key = evaluation_key(self.config, self.eval_count, teacher=stage == "icd")
                done = evaluation is not None and evaluation.get("key") == key
                items.append(PlanItem(f"evaluate_{stage}", "reuse" if done else "run", f"{paths.output}/{EVALUATION}"))
        version = self.registered_version()
        items.append(PlanItem("register", "reuse" if version else "run",
                              f"{self.model_name} version {version.version}" if version else self.model_name))
        items.append(PlanItem("promote", "run", "gates: " + ", ".join(g.metric for g in self.config.tracking.gates)))
        order = {s: i for i, s in enumerate(STEPS)}
        return sorted(items, key=lambda item: order[item.step])

    def registered_version(self):
        """The registry version made from this run's final model, if any."""
        import mlflow

        from icd.train.tracking import tracking_uri

        client = mlflow.MlflowClient(tracking_uri(self.config))
        identity = self.paths("cycle").identity
        try:
            found = client.search_model_versions(f"name = '{self.model_name}' and tags.`icd.identity` = '{identity}'")
        except Exception:  # the registered model does not exist yet
            return None
        return max(found, key=lambda v: int(v.version)) if found else None

    # --- running -----------------------------------------------------------------------------

    def execute(self, steps: list[str]) -> dict:
        import mlflow
        import ray

        from icd.data.latent_cache import ensure_latent_cache
        from icd.train.runner import run_stage
        from icd.train.stage_lock import stage_lock
        from icd.train.tracking import tracking_uri

        mlflow.set_tracking_uri(tracking_uri(self.config))
        client = mlflow.MlflowClient(tracking_uri(self.config))
        parent = self._parent_run(client)
        summary: dict = {"run": self.run, "parent_run_id": parent, "steps": {}}
        start = time.time()

        def done(step: str, **info) -> None:
            summary["steps"][step] = info
            self.say(f"[{time.time() - start:6.0f}s] {step}: {info.get('action', 'done')} {info.get('detail', '')}")

        try:
            if "shards" in steps:
                missing = [n for n in self.datasets() if not self.dataset_ready(n)]
                if missing:
                    raise PipelineError(f"datasets {missing} not found under {self.settings.uri('datasets')}/: write "
                                        "them with jobs/make_shards.py (e.g. --name shapes --eval-count 512 "
                                        "--val-count 256)")
                done("shards", action="present")
            if "latents" in steps:
                cache = ensure_latent_cache(self.config, settings=self.settings)
                done("latents", action="reused" if cache["reused"] else "built", detail=cache["cache"])

            manifests = {}
            for stage in ("cfg_distill", "icd"):
                manifests[stage] = self._stage(stage, steps, run_stage, parent)
                done(stage, action="reused" if manifests[stage].get("reused") else "trained",
                     detail=manifests[stage]["output"])
                summary.setdefault("no_regression", {})[stage] = self._no_regression(
                    stage, manifests[stage], manifests["cfg_distill"] if stage == "icd" else None)
            # evaluate_icd runs as a Ray task while cycle trains
            pending = None
            if "evaluate_icd" in steps:
                pending = ray.remote(num_cpus=0.25)(_evaluate_remote).remote(
                    self.config.to_dict(), manifests["icd"], self.eval_count, True)
            manifests["cycle"] = self._stage("cycle", steps, run_stage, parent)
            done("cycle", action="reused" if manifests["cycle"].get("reused") else "trained",
                 detail=manifests["cycle"]["output"])
            summary["no_regression"]["cycle"] = self._no_regression("cycle", manifests["cycle"], manifests["icd"])
            evaluations = {}
            if pending is not None:
                evaluations["icd"] = ray.get(pending)
                self._log_evaluation(client, parent, "evaluate_icd", evaluations["icd"])
                done("evaluate_icd", action="reused" if evaluations["icd"]["reused"] else "evaluated")
            # Two identical DAGs reach this point together: one evaluates and registers while the other
            # waits, then finds the evaluation and the version (check-then-act races otherwise).
            with stage_lock(f"models:/{self.model_name} from {manifests['cycle']['output']}", say=self.say,
                            activity="evaluated and registered"):
                if "evaluate_cycle" in steps:
                    from icd.evaluation.job import evaluate_stage

                    evaluations["cycle"] = evaluate_stage(self.config, manifests["cycle"], self.eval_count,
                                                          settings=self.settings)
                    self._log_evaluation(client, parent, "evaluate_cycle", evaluations["cycle"],
                                         extra=evaluations.get("icd"))
                    done("evaluate_cycle", action="reused" if evaluations["cycle"]["reused"] else "evaluated")
                summary["evaluation"] = {k: v["rows"] for k, v in evaluations.items()}
                version = None
                if "register" in steps:
                    version, reused = self._register(client, parent, manifests["cycle"], evaluations)
                    summary["version"] = version.version
                    done("register", action="reused" if reused else "registered",
                         detail=f"{self.model_name} version {version.version}")
            if "promote" in steps:
                from icd.registry.promotion import promote

                version = version or self.registered_version()
                if version is None:
                    raise PipelineError(f"nothing to promote: no {self.model_name} version from run {self.run}; "
                                        "run the register step first")
                decision = promote(client, self.model_name, version.version, self.config.tracking.gates)
                summary["promoted"] = decision.promote
                summary["promotion"] = decision.reasons
                done("promote", action="champion" if decision.promote else "challenger",
                     detail="; ".join(decision.reasons))
        except BaseException:
            client.set_terminated(parent, status="FAILED")
            raise
        client.set_terminated(parent, status="FINISHED")
        summary["seconds"] = round(time.time() - start, 1)
        return summary

    def _no_regression(self, stage: str, manifest: dict, input_manifest: dict | None) -> dict:
        """Measure the stage's output against its input; a stage that made things worse stops the DAG here."""
        from icd.evaluation.regression import StageRegression, refusal
        from icd.evaluation.stage_check import check_stage

        if not any(gate.stage == stage for gate in self.config.tracking.stage_gates):
            return {}
        _, results = check_stage(self.config, stage, manifest, input_manifest, self.settings)
        for result in results:
            self.say(f"  no-regression {result.describe()}")
        message = refusal(results)
        if message:
            raise StageRegression(message)
        return {r.metric: {"before": round(r.before, 4), "after": round(r.after, 4)} for r in results}

    def _stage(self, stage: str, steps: list[str], run_stage, parent: str) -> dict:
        if stage in steps:
            return run_stage(self.config, stage, run=self.run, settings=self.settings, parent_run_id=parent,
                             say=self.say)
        manifest = self.manifest(stage)
        if manifest is None:
            raise PipelineError(f"step {stage} is not selected and has no output at {self.paths(stage).output}; "
                                f"include it in --stages or start earlier with --from-stage")
        return {**manifest, "reused": True}

    def _parent_run(self, client) -> str:
        from icd.train.tracking import TAG_CONFIG, TAG_RUN, training_experiment

        experiment_id = training_experiment(client, self.config.tracking.experiment)
        run = client.create_run(experiment_id, tags={TAG_RUN: self.run, TAG_CONFIG: self.config.hash(),
                                                     "icd.stage": "dag", "mlflow.runName": f"dag-{self.run}"})
        client.log_text(run.info.run_id, self.config.to_yaml(), "config.yaml")
        return run.info.run_id

    def _log_evaluation(self, client, parent: str, step: str, evaluation: dict, extra: dict | None = None) -> None:
        """A child run with the table (CSV + PNG) and one metric per cell; not repeated for a reused evaluation."""
        from icd.evaluation.report import table_csv, table_png

        rows = {**(extra or {}).get("rows", {}), **evaluation["rows"]}
        existing = client.search_runs([client.get_run(parent).info.experiment_id],
                                      filter_string=f"tags.`icd.evaluation` = '{evaluation['key']}:{evaluation['model']}'",
                                      max_results=1)
        if existing:
            return
        run = client.create_run(client.get_run(parent).info.experiment_id, tags={
            "mlflow.parentRunId": parent, "icd.stage": step, "mlflow.runName": step,
            "icd.evaluation": f"{evaluation['key']}:{evaluation['model']}"})
        run_id = run.info.run_id
        for row, metrics in rows.items():
            for name, value in metrics.items():
                client.log_metric(run_id, f"{row}.{evaluation['lpips'] if name == 'lpips' else name}", float(value))
        client.log_text(run_id, table_csv(rows, evaluation["lpips"]), "evaluation.csv")
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as tmp:
            png = Path(tmp) / "evaluation.png"
            png.write_bytes(table_png(rows, evaluation["lpips"]))
            client.log_artifact(run_id, str(png))
        client.set_terminated(run_id)

    def _register(self, client, parent: str, manifest: dict, evaluations: dict) -> tuple:
        """Log the final model as a pyfunc in a child run and register it; a model already registered is reused."""
        import mlflow

        from icd.registry.model import log_edit_model
        from icd.registry.promotion import tag_metrics

        existing = self.registered_version()
        if existing is not None:
            return existing, True
        metrics = (evaluations.get("cycle") or {}).get("rows", {}).get(manifest["stage"], {})
        experiment_id = client.get_run(parent).info.experiment_id
        with mlflow.start_run(experiment_id=experiment_id, run_name="register",
                              tags={"mlflow.parentRunId": parent, "icd.stage": "register"}):
            info = log_edit_model(manifest, self.config, self.settings, registered_model=self.model_name,
                                  metrics=metrics)
        version = str(info.registered_model_version)
        client.set_model_version_tag(self.model_name, version, "icd.identity", manifest["identity"])
        client.set_model_version_tag(self.model_name, version, "icd.run", self.run)
        tag_metrics(client, self.model_name, version, metrics)
        return client.get_model_version(self.model_name, version), False


def _evaluate_remote(config_tree: dict, manifest: dict, eval_count: int, teacher: bool) -> dict:
    from icd.config import Config
    from icd.evaluation.job import evaluate_stage

    return evaluate_stage(Config.model_validate(config_tree), manifest, eval_count, teacher)
