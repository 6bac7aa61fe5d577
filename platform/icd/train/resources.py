"""Before a stage starts: does the cluster have what it needs free, and if not, who holds it?

Ray waits without a word for resources that are held: a stage submitted while the served editor
holds the CPUs it needs would sit at its first Ray Data step forever. ``wait_for_resources``
waits a bounded time (asking an autoscaler, if there is one, for the bundles meanwhile) and then
fails with what the stage needs, what is free, which actors hold the rest and how to free them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

# Ray Data's read tasks take this much CPU each (icd.data.reader.READ_CPUS); its Parquet
# sampling tasks, run while the dataset is built, take one whole CPU.
DATA_CPUS = 0.25
SAMPLING_CPUS = 1.0


class ClusterBusyError(RuntimeError):
    pass


def stage_demand(scaling) -> dict[str, float]:
    """The logical resources a stage holds at once: its workers plus one Ray Data task."""
    cpus = max(scaling.num_workers * scaling.cpus_per_worker + DATA_CPUS, SAMPLING_CPUS)
    demand = {"CPU": round(cpus, 4)}
    if scaling.use_gpu:
        demand["GPU"] = round(scaling.num_workers * scaling.gpus_per_worker, 4)
    for name, amount in scaling.custom_resources_per_worker.items():
        demand[name] = round(scaling.num_workers * amount, 4)
    return demand


def shortfall(demand: dict[str, float], available: dict[str, float]) -> dict[str, float]:
    """What ``available`` lacks of ``demand`` (empty when it fits)."""
    return {k: round(v - available.get(k, 0.0), 4) for k, v in demand.items() if available.get(k, 0.0) + 1e-6 < v}


@dataclass(frozen=True)
class Holder:
    name: str
    resources: dict


def busy_message(stage: str, demand: dict, total: dict, available: dict, holders: list[Holder],
                 waited_s: float) -> str:
    def amounts(resources: dict) -> str:
        return ", ".join(f"{resources.get(k, 0.0):g} {k}" for k in demand)

    lines = [f"{stage}: the stage needs {amounts(demand)} (scaling.num_workers x cpus_per_worker, plus "
             f"{DATA_CPUS:g} CPU for Ray Data); after {waited_s:.0f} s the cluster has {amounts(available)} free "
             f"of {amounts(total)}."]
    held = [h for h in holders if any(h.resources.get(k) for k in demand)]
    if held:
        lines.append("Held by: " + "; ".join(f"{h.name} ({amounts(h.resources)})" for h in held) + ".")
    if any(h.name.startswith(("ServeReplica", "SERVE_REPLICA")) for h in held):
        lines.append("The served editor holds some: stop it with `icd serve down` (local stack) or "
                     "`serve shutdown`, then submit again.")
    lines.append("Or lower scaling.num_workers / scaling.cpus_per_worker, or raise "
                 "scaling.resources_timeout_s on a cluster that adds nodes.")
    return " ".join(lines)


def resource_holders() -> list[Holder]:
    """Alive actors and the logical resources they hold (Serve replicas, Train workers, ...)."""
    from ray.util.state import list_actors

    holders = []
    for actor in list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=1000, raise_on_missing_output=False):
        resources = {k: float(v) for k, v in (actor.required_resources or {}).items() if v}
        if resources:  # the class name reads best: ServeReplica:icd:Editor, not SERVE_REPLICA::icd#Editor#x1y2
            holders.append(Holder(actor.class_name or actor.name, resources))
    return holders


def wait_for_resources(stage: str, scaling, timeout_s: float, poll_s: float = 2.0, say=print) -> None:
    """Return once the stage's demand is free; ``ClusterBusyError`` after ``timeout_s`` (0: do not check)."""
    import ray

    if timeout_s <= 0:
        return
    demand = stage_demand(scaling)
    started, asked = time.monotonic(), False
    try:
        while True:
            missing = shortfall(demand, ray.available_resources())
            if not missing:
                return
            waited = time.monotonic() - started
            if waited >= timeout_s:
                try:
                    holders = resource_holders()
                except Exception:  # the state API is a convenience here; the error must still come
                    holders = []
                raise ClusterBusyError(busy_message(stage, demand, ray.cluster_resources(),
                                                    ray.available_resources(), holders, waited))
            if not asked:
                say(f"{stage}: waiting up to {timeout_s:.0f} s for {missing} more to be free")
                asked = _ask_autoscaler(worker_bundles(scaling))
            time.sleep(poll_s)
    finally:
        if asked:
            _ask_autoscaler(None)


def worker_bundles(scaling) -> list[dict]:
    """One bundle per Train worker, as its placement group asks for them."""
    bundle = {"CPU": scaling.cpus_per_worker, **({"GPU": scaling.gpus_per_worker} if scaling.use_gpu else {})}
    return [bundle] * scaling.num_workers


def _ask_autoscaler(bundles: list[dict] | None) -> bool:
    """Ask an autoscaler (KubeRay) for the workers' bundles, or withdraw the request; False if there is none."""
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles or [])
        return bool(bundles)
    except Exception:
        return False
