"""Faults a cluster really has, each injected into a real run, with the figure it produced.

    python benchmarks/faults.py [--only node_loss,s3_outage] [--port-base 34000] [--outage-s 30]

The suite brings up a stack of its own (S3, MLflow, a Ray head on the machine's address, on ports
from ``--port-base``) plus two worker nodes (`icd.stack.nodes`, 1 CPU each; every train worker
asks for ``icd_worker_node``, so a two-worker stage runs one worker per node), writes a small
shapes dataset, and then, in this order:

    driver_kill      the DAG's driver SIGKILLed while `icd` trains; the DAG resubmitted
    concurrent_dag   two identical DAG submissions at once
    node_loss        a worker node (raylet + workers) SIGKILLed mid-stage, added back 5 s later
    s3_outage        SeaweedFS stopped for --outage-s seconds mid-stage, then started again
    mlflow_outage    the tracking server stopped for --outage-s seconds mid-stage
    replica_kill     the Editor replica's process SIGKILLed with edits in flight (6 clients)
    broken_alias     the champion alias moved to a version that cannot load, the deployment
                     updated (`icd serve up`) under load, then the alias moved back

``lost_steps``: optimizer steps done twice (the step reached before the fault minus the
checkpoint the run resumed from). ``failed_requests``: HTTP answers other than 200 over the
whole load (before, during and after the fault). The stack and the nodes are stopped at the end (only what the suite started).
Last line: {"<fault>": {"survived": ..., "lost_steps": ..., "failed_requests": ..., "seconds": ...}, ...}
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the `serve` package, for the Serve faults
BIN = Path(sys.executable).parent
DATASET = "faults-shapes"
# A tiny DAG (the e2e test's sizes) with an icd stage long enough to be hit mid-way.
DAG = [
    f"data.dataset={DATASET}", f"data.eval_dataset={DATASET}-eval", "tracking.experiment=icd-faults",
    "scaling.custom_resources_per_worker={icd_worker_node: 1}",
    "train.cfg_distill.global_batch_size=8", "train.icd.global_batch_size=8", "train.cycle.global_batch_size=4",
    "train.cfg_distill.steps=4", "train.cfg_distill.checkpoint_every=2",
    "train.icd.steps=16", "train.icd.checkpoint_every=4", "train.icd.log_every=1", "train.icd.images_every=16",
    "train.cycle.steps=4", "train.cycle.checkpoint_every=2",
    # No stage gates: 4-24 steps of the toy recipe move the model either way (icd after 16 steps at batch 8:
    # 20.66 -> 16.95 dB, issue 18's drift), and a refusal would hide the fault's outcome. node_loss still
    # measures its stage the way the gate does (`Context.evaluate`).
    "tracking.stage_gates=[]",
]
EVAL_COUNT = 16
PROGRESS = r"{stage}  step +(\d+)/"


# --- reading a job's output -----------------------------------------------------------------------

def stage_steps(log: str, stage: str) -> list[int]:
    """Rank 0's progress steps of ``stage``, in the order printed."""
    return [int(s) for s in re.findall(PROGRESS.format(stage=stage), log)]


def lost_steps(steps: list[int], resumed_from: list[int]) -> int:
    """Steps trained twice: for each restart, the last step printed before it minus the checkpoint resumed from."""
    lost, restarts = 0, iter(resumed_from)
    for before, after in zip(steps, steps[1:]):
        if after <= before:
            lost += before - next(restarts, after - 1)
    return lost


def last_json(text: str) -> dict:
    lines = [line for line in text.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"no JSON line in the job's output:\n{text[-3000:]}")
    return json.loads(lines[-1])


class Job:
    """A `ray job submit` client process, its output read line by line on a thread."""

    def __init__(self, env: dict, *args: str):
        command = [str(BIN / "ray"), "job", "submit", "--working-dir", ".", "--", "python", *args]
        self.process = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._seen = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            with self._seen:
                self.lines.append(line)
                self._seen.notify_all()
        with self._seen:
            self._seen.notify_all()

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout_s: float = 900) -> bool:
        """Until a line matches ``pattern``; False if the job ended (or the time passed) first."""
        regex, deadline = re.compile(pattern), time.monotonic() + timeout_s
        with self._seen:
            while time.monotonic() < deadline:
                if any(regex.search(line) for line in self.lines):
                    return True
                if not self._reader.is_alive():
                    return False
                self._seen.wait(1)
        return False

    def finish(self, timeout_s: float = 1200) -> int:
        self.process.wait(timeout=timeout_s)
        self._reader.join(timeout=30)
        return self.process.returncode


def dag_args(run: str, *extra: str) -> list[str]:
    return ["jobs/train_icd.py", "--config", "jobs/configs/toy.yaml", "--run", run, "--eval-count", str(EVAL_COUNT),
            *[a for s in (*DAG, *extra) for a in ("--set", s)]]


def stage_args(run: str, stage: str, *extra: str) -> list[str]:
    return ["jobs/train_stage.py", "--stage", stage, "--config", "jobs/configs/toy.yaml", "--run", run,
            *[a for s in (*DAG, *extra) for a in ("--set", s)]]


def drivers(script: str, run: str) -> list:
    """The driver processes of a job (``python <script> ... --run <run>``), not the `ray job submit` client."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if len(cmd) > 1 and Path(cmd[0]).name.startswith("python") and cmd[1] == script and run in cmd:
            found.append(proc)
    return found


# --- the faults ------------------------------------------------------------------------------------

def driver_kill(ctx) -> dict:
    """SIGKILL the DAG's driver while `icd` trains; the resubmitted DAG must reuse cfg_distill and resume icd."""
    run = "faults-dag"
    first = Job(ctx.env, *dag_args(run))
    if not first.wait_for(PROGRESS.format(stage="icd").replace(r"(\d+)", "6")):
        raise RuntimeError(f"the DAG ended before icd reached step 6:\n{first.log[-3000:]}")
    victims = drivers("jobs/train_icd.py", run)
    if len(victims) != 1:
        raise RuntimeError(f"expected one driver process of run {run}, found {[p.pid for p in victims]}")
    killed_at = stage_steps(first.log, "icd")[-1]
    victims[0].send_signal(signal.SIGKILL)
    first_rc = first.finish()
    again = Job(ctx.env, *dag_args(run))
    rc = again.finish()
    summary = last_json(again.log) if rc == 0 else {}
    actions = {step: info.get("action") for step, info in summary.get("steps", {}).items()}
    icd_manifest = ctx.manifest(run, "icd")
    resumed = icd_manifest["resumed_from"] if icd_manifest else []
    ctx.champion_run = run
    return {"survived": rc == 0 and first_rc != 0 and actions.get("cfg_distill") == "reused"
            and icd_manifest is not None and icd_manifest["steps"] == 16 and bool(resumed),
            "lost_steps": killed_at - (resumed[0] if resumed else 0), "killed_at_step": killed_at,
            "resumed_from": resumed, "actions": actions, "registered_version": summary.get("version")}


def concurrent_dag(ctx) -> dict:
    """Two identical DAGs at once: each training stage trained by one of them, one registry version."""
    import mlflow

    run = "faults-twin"
    twin = ("train.icd.steps=4", "train.icd.checkpoint_every=2")
    jobs = [Job(ctx.env, *dag_args(run, *twin)) for _ in range(2)]
    codes = [job.finish() for job in jobs]
    if codes != [0, 0]:
        raise RuntimeError(f"exit codes {codes}:\n" + "\n".join(job.log[-2000:] for job in jobs))
    summaries = [last_json(job.log) for job in jobs]
    trained = {stage: sum(s["steps"][stage]["action"] == "trained" for s in summaries)
               for stage in ("cfg_distill", "icd", "cycle")}
    outputs = [{stage: s["steps"][stage]["detail"] for stage in trained} for s in summaries]
    client = mlflow.MlflowClient(ctx.settings.mlflow_uri)
    identity = ctx.manifest(run, "cycle", *twin)["identity"]
    versions = client.search_model_versions(f"name = 'icd-toy' and tags.`icd.identity` = '{identity}'")
    return {"survived": all(n == 1 for n in trained.values()) and outputs[0] == outputs[1] and len(versions) == 1
            and summaries[0]["version"] == summaries[1]["version"],
            "lost_steps": 0, "trained_by_one": trained, "registry_versions": len(versions)}


def node_loss(ctx) -> dict:
    """SIGKILL a worker node (raylet and workers) at icd step 10 of 24; add it back 5 s later."""
    from icd.stack.nodes import kill_node, start_node

    run, extra = ctx.champion_run, ("train.icd.steps=24",)
    ctx.ensure_input(run, "icd")
    job = Job(ctx.env, *stage_args(run, "icd", *extra))
    if not job.wait_for(PROGRESS.format(stage="icd").replace(r"(\d+)", "10")):
        raise RuntimeError(f"the stage ended before step 10:\n{job.log[-3000:]}")
    node = ctx.nodes[0]
    kill_node(node)
    time.sleep(5)
    ctx.nodes[0] = start_node(ctx.settings, node.index)
    rc = job.finish()
    manifest = ctx.manifest(run, "icd", *extra)
    evaluation = ctx.evaluate(run, "icd", *extra) if manifest else {}
    resumed = manifest["resumed_from"] if manifest else []
    return {"survived": rc == 0 and manifest is not None and manifest["steps"] == 24 and bool(evaluation),
            "lost_steps": lost_steps(stage_steps(job.log, "icd"), resumed), "resumed_from": resumed,
            "restarts": len(resumed), "psnr_before_after": evaluation}


def service_outage(ctx, service: str, steps: int) -> dict:
    """Stop one stack service for ``ctx.outage_s`` at icd step 3, start it again; the stage must finish."""
    from icd.stack.lifecycle import stop_services, up

    run, extra = ctx.champion_run, (f"train.icd.steps={steps}",)
    ctx.ensure_input(run, "icd")
    job = Job(ctx.env, *stage_args(run, "icd", *extra))
    if not job.wait_for(PROGRESS.format(stage="icd").replace(r"(\d+)", "3")):
        raise RuntimeError(f"the stage ended before step 3:\n{job.log[-3000:]}")
    stop_services(ctx.settings, [service])
    time.sleep(ctx.outage_s)
    up(ctx.settings, say=lambda msg: None)
    rc = job.finish()
    attempts = 1
    if rc != 0:  # failed with a message: a resubmission must resume from S3
        attempts = 2
        retry = Job(ctx.env, *stage_args(run, "icd", *extra))
        rc = retry.finish()
        job.lines += retry.lines
    manifest = ctx.manifest(run, "icd", *extra)
    resumed = manifest["resumed_from"] if manifest else []
    incomplete = ctx.incomplete_checkpoints(run, "icd", *extra)
    return {"survived": rc == 0 and manifest is not None and manifest["steps"] == steps and not incomplete,
            "lost_steps": lost_steps(stage_steps(job.log, "icd"), resumed), "submissions": attempts,
            "resumed_from": resumed, "incomplete_checkpoints": incomplete, "log": job.log}


def s3_outage(ctx) -> dict:
    result = service_outage(ctx, "s3", steps=20)
    log = result.pop("log")
    result["retry_messages"] = len(re.findall(r"(?i)retry|retrying", log))
    return result


def mlflow_outage(ctx) -> dict:
    """The stage must finish on its first submission; metrics of the outage are queued, one warning says so."""
    import mlflow

    steps = 22
    result = service_outage(ctx, "mlflow", steps=steps)
    log = result.pop("log")
    manifest = ctx.manifest(ctx.champion_run, "icd", f"train.icd.steps={steps}")
    history = []
    if manifest and manifest.get("mlflow_run_id"):
        history = mlflow.MlflowClient(ctx.settings.mlflow_uri).get_metric_history(manifest["mlflow_run_id"], "loss")
    logged = sorted({m.step for m in history})
    warnings = log.count("the tracking server did not take metrics")
    result.update(survived=result["survived"] and result["submissions"] == 1, warnings=warnings,
                  metric_steps_logged=f"{len(logged)}/{steps}")
    return result


def serve_load(url: str, stop: threading.Event, results: list, clients: int = 6) -> list[threading.Thread]:
    """Edits from ``clients`` threads until ``stop``: (start time, status, latency s) appended to ``results``."""
    import requests

    def body(i: int) -> dict:
        from PIL import Image

        from icd.data.shapes import random_sample

        buffer = io.BytesIO()
        Image.fromarray(random_sample(i).image).save(buffer, format="PNG")
        return {"image": base64.b64encode(buffer.getvalue()).decode(), "source_prompt": "a red circle on a blue "
                "background", "target_prompt": "a green circle on a blue background"}

    def client(k: int) -> None:
        i = k
        while not stop.is_set():
            started = time.monotonic()
            try:
                status = requests.post(f"{url}/v1/edit", json=body(i % 32), timeout=120).status_code
            except requests.RequestException:
                status = 0
            results.append((started, status, time.monotonic() - started))
            i += clients

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for thread in threads:
        thread.start()
    return threads


def latency_figures(results: list, fault_at: float) -> dict:
    before = sorted(r[2] for r in results if r[0] < fault_at and r[1] == 200)
    during = [r for r in results if r[0] + r[2] >= fault_at]
    return {"requests": len(results), "failed_requests": sum(r[1] != 200 for r in results),
            "p50_ms_before": round(1000 * before[len(before) // 2]) if before else None,
            "max_ms_after_fault": round(1000 * max((r[2] for r in during), default=0))}


def replica_kill(ctx) -> dict:
    """SIGKILL the Editor replica's process under load; Serve starts another, the Gateway resends."""
    import psutil

    from icd.stack import serving

    ctx.ensure_champion()
    served = serving.up(ctx.settings)
    before = editor_replicas(ctx)
    results, stop = [], threading.Event()
    threads = serve_load(ctx.settings.serve_url, stop, results)
    time.sleep(15)
    fault_at = time.monotonic()
    psutil.Process(before[0]["pid"]).kill()
    # until a new replica has answered for 15 s
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        after = [r for r in editor_replicas(ctx) if r["actor_id"] != before[0]["actor_id"]]
        if after and any(r[0] > fault_at and r[1] == 200 for r in results):
            break
        time.sleep(1)
    recovered = time.monotonic() - fault_at
    time.sleep(15)
    stop.set()
    for thread in threads:
        thread.join(timeout=150)
    figures = latency_figures(results, fault_at)
    resends = serve_log_count(ctx, "replica lost")
    return {"survived": figures["failed_requests"] == 0 and bool(after), "lost_steps": None, **figures,
            "seconds_to_new_replica": round(recovered, 1), "gateway_resends": resends,
            "served_version": served.get("version")}


def broken_alias(ctx) -> dict:
    """The champion alias moved to a version whose files are missing, `icd serve up` run under load."""
    import mlflow

    from icd.stack import serving
    from icd.stack.settings import StackError

    client = mlflow.MlflowClient(ctx.settings.mlflow_uri)
    good = client.get_model_version_by_alias("icd-toy", "champion").version
    broken = client.create_model_version("icd-toy", source=f"s3://{ctx.settings.bucket}/faults/no-such-model",
                                         description="a version whose artifacts are missing (benchmarks/faults.py)",
                                         await_creation_for=0)
    results, stop = [], threading.Event()
    threads = serve_load(ctx.settings.serve_url, stop, results)
    time.sleep(10)
    fault_at = time.monotonic()
    client.set_registered_model_alias("icd-toy", "champion", broken.version)
    refusal = None
    try:
        serving.up(ctx.settings)
    except StackError as exc:
        refusal = str(exc)
    time.sleep(30)  # what the application does meanwhile, under load
    served = served_version(ctx)
    client.set_registered_model_alias("icd-toy", "champion", good)
    restored = serving.up(ctx.settings).get("version")
    stop.set()
    for thread in threads:
        thread.join(timeout=150)
    figures = latency_figures(results, fault_at)
    return {"survived": figures["failed_requests"] == 0 and served == good and restored == good
            and f"version {broken.version}" in (refusal or ""),
            "lost_steps": None, **figures, "broken_version": broken.version, "served_meanwhile": served,
            "refusal": (refusal or "none")[:300], "restored": restored}


def served_version(ctx, timeout_s: float = 60) -> str | None:
    """The version ``/v1/models`` names; None if it gave no JSON answer for ``timeout_s``."""
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            response = requests.get(f"{ctx.settings.serve_url}/v1/models", timeout=30)
            if response.ok:
                return response.json().get("version")
        except (requests.RequestException, ValueError):
            pass
        time.sleep(2)
    return None


def editor_replicas(ctx) -> list[dict]:
    import requests

    from icd.stack.services import ray_auth_headers

    rows = requests.get(f"{ctx.settings.ray_dashboard_url}/api/v0/actors", headers=ray_auth_headers(ctx.settings),
                        params={"limit": 1000, "detail": "true"}, timeout=30).json()["data"]["result"]["result"]
    return [r for r in rows if r["state"] == "ALIVE" and "Editor" in (r.get("name") or "")]


def serve_log_count(ctx, needle: str) -> int:
    """Occurrences of ``needle`` in the Gateway replicas' logs, on the head and on every worker node."""
    roots = [ctx.settings.ray_temp_dir, *(node.temp_dir for node in ctx.nodes)]
    return sum(path.read_text(errors="replace").count(needle) for root in roots
               for path in (root / "session_latest" / "logs" / "serve").glob("replica_icd_Gateway_*.log"))


FAULTS = {"driver_kill": driver_kill, "concurrent_dag": concurrent_dag, "node_loss": node_loss,
          "s3_outage": s3_outage, "mlflow_outage": mlflow_outage, "replica_kill": replica_kill,
          "broken_alias": broken_alias}


# --- the cluster ---------------------------------------------------------------------------------

class Context:
    def __init__(self, settings, nodes, outage_s: float):
        self.settings, self.nodes, self.outage_s = settings, nodes, outage_s
        self.env = {**os.environ, **settings.client_env()}
        self.champion_run = "faults-dag"

    def ensure_input(self, run: str, stage: str) -> None:
        """Train the stage before ``stage`` in ``run`` if it is missing (a fault run on its own, ``--only``)."""
        from icd.train.stages import PREVIOUS

        if self.manifest(run, PREVIOUS[stage]) is None:
            job = Job(self.env, *stage_args(run, PREVIOUS[stage]))
            if job.finish() != 0:
                raise RuntimeError(f"{PREVIOUS[stage]} for run {run} failed:\n{job.log[-3000:]}")

    def ensure_champion(self) -> None:
        """A champion to serve: the fault DAG's model (trained here when driver_kill did not run)."""
        import mlflow

        try:
            mlflow.MlflowClient(self.settings.mlflow_uri).get_model_version_by_alias("icd-toy", "champion")
        except mlflow.exceptions.MlflowException:
            job = Job(self.env, *dag_args(self.champion_run))
            if job.finish() != 0:
                raise RuntimeError(f"the DAG for a champion failed:\n{job.log[-3000:]}") from None

    def _config(self, *extra: str):
        from icd.config import load_config

        return load_config("jobs/configs/toy.yaml", [*DAG, *extra])

    def _paths(self, run: str, stage: str, *extra: str):
        from icd.storage import S3Settings
        from icd.train.stages import StagePaths

        return StagePaths.of(self._config(*extra), stage, run, settings=S3Settings.from_env(self.env))

    def manifest(self, run: str, stage: str, *extra: str) -> dict | None:
        from icd.storage import S3Settings
        from icd.train.stages import read_stage_manifest

        return read_stage_manifest(self._paths(run, stage, *extra).manifest, S3Settings.from_env(self.env))

    def incomplete_checkpoints(self, run: str, stage: str, *extra: str) -> list[str]:
        """Kept checkpoints that lack a file or whose state.json names another step."""
        from icd.evaluation.stage_check import kept_checkpoints
        from icd.storage import S3Settings, read_json

        settings = S3Settings.from_env(self.env)
        paths = self._paths(run, stage, *extra)
        bad = []
        for step, uri in kept_checkpoints(paths.storage_path, paths.trainer_name, settings).items():
            state = read_json(f"{uri}/state.json", settings)
            if state is None or state.get("step") != step or not _exists(f"{uri}/trainable.safetensors", settings):
                bad.append(uri)
        return bad

    def evaluate(self, run: str, stage: str, *extra: str) -> dict:
        """The stage's no-regression measurement (its output loaded and evaluated like the DAG does)."""
        from icd.evaluation.stage_check import check_stage
        from icd.storage import S3Settings

        with _env(self.env):  # the suite runs without gates; the measurement takes the toy preset's PSNR gate
            config = self._config(*extra, f"tracking.stage_gates=[{{stage: {stage}, metric: psnr}}]")
            settings = S3Settings.from_env(self.env)
            previous = self.manifest(run, "cfg_distill", *extra)
            _, results = check_stage(config, stage, self.manifest(run, stage, *extra), previous, settings,
                                     log_to_mlflow=False)
        return {r.metric: [round(r.before, 3), round(r.after, 3)] for r in results}


def _exists(uri: str, settings) -> bool:
    from pyarrow import fs as pafs

    from icd.storage import filesystem_for

    fs, path = filesystem_for(uri, settings)
    return fs.get_file_info(path).type == pafs.FileType.File


@contextlib.contextmanager
def _env(env: dict):
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def stack_settings(port_base: int, state_dir: Path):
    import ray._private.services

    from icd.stack import StackSettings

    base = port_base
    return StackSettings(
        _env_file=None, state_dir=state_dir, host=ray._private.services.get_node_ip_address(), bucket="icd-faults",
        s3_access_key="faults" + secrets.token_hex(4), s3_secret_key=secrets.token_urlsafe(24),
        s3_port=base, mlflow_port=base + 1, ray_port=base + 2, ray_dashboard_port=base + 3, ray_client_port=base + 4,
        serve_port=base + 5, s3_internal_port_base=base + 10, ray_internal_port_base=base + 20,
        ray_num_cpus=1, ray_object_store_mb=512)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help=f"comma-separated subset of: {','.join(FAULTS)} (their order is kept)")
    parser.add_argument("--port-base", type=int, default=34000)
    parser.add_argument("--outage-s", type=float, default=30)
    args = parser.parse_args()
    chosen = [f for f in FAULTS if not args.only or f in args.only.split(",")]
    unknown = set(args.only.split(",")) - set(FAULTS) if args.only else set()
    if unknown:
        parser.error(f"--only: unknown {sorted(unknown)}; expected some of {', '.join(FAULTS)}")

    from icd.stack import down, up
    from icd.stack.nodes import stop_node, worker_nodes

    state_dir = Path(tempfile.gettempdir()) / f"icd-faults-{args.port_base}"
    settings = stack_settings(args.port_base, state_dir)
    down(settings, say=lambda msg: None)  # whatever a killed earlier run left
    # a clean start: stage outputs an earlier run left would be reused, and the faults would hit nothing
    shutil.rmtree(state_dir, ignore_errors=True)
    for node_dir in settings.ray_temp_dir.parent.glob(f"{settings.ray_temp_dir.name}-n*"):
        shutil.rmtree(node_dir, ignore_errors=True)
    up(settings, say=print)
    report: dict = {}
    started = time.monotonic()
    try:
        with worker_nodes(settings, count=2) as nodes:
            ctx = Context(settings, nodes, args.outage_s)
            made = subprocess.run([sys.executable, "jobs/make_shards.py", "--name", DATASET, "--count", "128",
                                   "--per-shard", "32", "--eval-count", str(EVAL_COUNT), "--skip-existing"],
                                  env=ctx.env, cwd=REPO, capture_output=True, text=True, timeout=600)
            if made.returncode != 0:
                raise SystemExit(f"make_shards failed:\n{made.stderr[-3000:]}")
            for name in chosen:
                print(f"== {name}", flush=True)
                t0 = time.monotonic()
                try:
                    with _env(ctx.env):
                        result = FAULTS[name](ctx)
                except Exception as exc:
                    traceback.print_exc()
                    result = {"survived": False, "error": f"{type(exc).__name__}: {str(exc)[:500]}"}
                result["seconds"] = round(time.monotonic() - t0, 1)
                report[name] = result
                print(f"   {json.dumps(result)}", flush=True)
            for node in ctx.nodes:  # node_loss may have replaced one
                stop_node(node)
    finally:
        down(settings, say=lambda msg: None)
    report["total_seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
