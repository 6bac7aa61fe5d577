"""Worker nodes beside the stack's Ray head on one machine: a real multi-node cluster for tests and benchmarks.

Each node is its own ``ray start --address=<head>`` (its own raylet, object store and workers, on
its own ports), advertising ``num_cpus`` and a custom resource ``icd_node_<i>`` plus the shared
``icd_worker_node``; a stage with ``scaling.custom_resources_per_worker: {icd_worker_node: 1}``
therefore runs one train worker per worker node. Nodes are started and stopped by the PID recorded
when they started (`icd.stack.processes`), never by name: stopping them touches nothing else.

    with worker_nodes(settings, count=2) as nodes:   # or start_node / stop_node
        ...
        kill_node(nodes[0])                           # a node lost: raylet and workers SIGKILLed
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from icd.stack.processes import ProcessRecord, family, port_is_free, spawn, terminate
from icd.stack.settings import StackError, StackSettings

WORKER_RESOURCE = "icd_worker_node"  # every worker node has 1: one train worker per node
NODE_PORT_NAMES = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                   "metrics-export-port", "node-manager-port", "object-manager-port")


@dataclass
class WorkerNode:
    index: int
    record: ProcessRecord
    settings: StackSettings
    temp_dir: Path  # its Ray session, logs and sockets

    @property
    def resource(self) -> str:
        """The custom resource only this node has."""
        return node_resource(self.index)

    @property
    def tag(self) -> str:
        return f"{self.settings.stack_id}/node-{self.index}"

    def processes(self):
        return family(self.record.process(), self.tag)

    def alive(self) -> bool:
        return self.record.process() is not None


def node_resource(index: int) -> str:
    return f"icd_node_{index}"


def node_ports(settings: StackSettings, index: int) -> dict[str, int]:
    """Worker node ``index``'s ports: ten above the head's internal ports per node."""
    base = settings.ray_internal_port_base + 10 * (index + 1)
    return {name: base + i for i, name in enumerate(NODE_PORT_NAMES)}


def node_temp_dir(settings: StackSettings, index: int, incarnation: int = 0) -> Path:
    """Worker node ``index``'s own Ray temp dir (session, logs, sockets); a node started again gets a new one.

    Nodes on one machine would otherwise share the head's session directory, and every node's log
    monitor would forward every worker's output: each line of a job's log printed once per node. A
    node restarted on its old directory would forward its dead workers' logs again from the start.
    """
    suffix = f"-n{index}" + (f"r{incarnation}" if incarnation else "")
    return settings.ray_temp_dir.with_name(settings.ray_temp_dir.name + suffix)


def fresh_node_temp_dir(settings: StackSettings, index: int) -> Path:
    incarnation = 0
    while node_temp_dir(settings, index, incarnation).exists():
        incarnation += 1
    return node_temp_dir(settings, index, incarnation)


def _node_command(settings: StackSettings, index: int, num_cpus: float, object_store_mb: int,
                  temp_dir: Path) -> list[str]:
    from icd.stack.services import find_binary

    ray = find_binary("ray", "install the project (make install) so Ray is in .venv")
    resources = {node_resource(index): 1, WORKER_RESOURCE: 1}
    return [ray, "start", f"--address={settings.host}:{settings.ray_port}", "--block", "--disable-usage-stats",
            f"--node-ip-address={settings.host}", f"--num-cpus={num_cpus:g}", f"--resources={json.dumps(resources)}",
            f"--object-store-memory={object_store_mb * 1024 * 1024}", f"--temp-dir={temp_dir}",
            *(f"--{name}={port}" for name, port in node_ports(settings, index).items())]


def start_node(settings: StackSettings, index: int, num_cpus: float = 1, object_store_mb: int = 256,
               timeout_s: float = 90) -> WorkerNode:
    """Start worker node ``index`` joined to the stack's head and wait until the head lists it alive."""
    from icd.stack.processes import STACK_ID_VAR
    from icd.stack.services import _ray_env

    busy = [f"{name} {port}" for name, port in node_ports(settings, index).items()
            if not port_is_free(settings.host, port)]
    if busy:
        raise StackError(f"worker node {index}: ports in use ({', '.join(busy)}); stop what holds them or "
                         "change ICD_RAY_INTERNAL_PORT_BASE")
    if settings.loopback_only:
        # `ray start --address` rewrites a loopback head address to the machine's own IP, where a
        # loopback-only head does not listen (and with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which keeps
        # the head's clients on loopback, it refuses to join at all).
        raise StackError(f"worker nodes cannot join a head on {settings.host}: start the stack on the machine's "
                         "address (ICD_HOST=<ip>) for a multi-node cluster")
    env = {**_ray_env(settings), STACK_ID_VAR: f"{settings.stack_id}/node-{index}"}
    log = settings.state_dir / "logs" / f"ray-node-{index}.log"
    temp_dir = fresh_node_temp_dir(settings, index)
    record = spawn(f"ray-node-{index}", _node_command(settings, index, num_cpus, object_store_mb, temp_dir), env, log,
                   settings.state_dir)
    node = WorkerNode(index, record, settings, temp_dir)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not node.alive():
            from icd.stack.processes import log_tail

            raise StackError(f"worker node {index} exited while starting:\n{log_tail(log)}")
        if node_resource(index) in alive_node_resources(settings):
            return node
        time.sleep(1)
    stop_node(node)
    raise StackError(f"worker node {index} did not join the head at {settings.host}:{settings.ray_port} "
                     f"within {timeout_s:.0f} s (log: {log})")


def alive_node_resources(settings: StackSettings) -> set[str]:
    """The custom node resources of the cluster's live nodes, from the head's state API."""
    import requests

    from icd.stack.services import ray_auth_headers

    try:
        response = requests.get(f"{settings.ray_dashboard_url}/api/v0/nodes", headers=ray_auth_headers(settings),
                                params={"limit": 100, "detail": "true"}, timeout=10)
        rows = response.json()["data"]["result"]["result"]
    except (requests.RequestException, KeyError, ValueError):
        return set()
    return {name for row in rows if row.get("state") == "ALIVE"
            for name in (row.get("resources_total") or {}) if name.startswith("icd_node_")}


def stop_node(node: WorkerNode, grace_s: float = 10) -> None:
    """Stop a node the way an operator would (SIGTERM, then SIGKILL): its raylet and its workers."""
    terminate(node.processes(), grace_s=grace_s)


def kill_node(node: WorkerNode) -> None:
    """A node lost at once: SIGKILL to its raylet and every process it started (no draining)."""
    processes = node.processes()
    for proc in processes:
        with contextlib.suppress(Exception):
            proc.kill()
    terminate(processes, grace_s=5)  # reaps them; anything that survived SIGKILL is reported by psutil


def stop_leftover_nodes(settings: StackSettings, grace_s: float = 10) -> list[int]:
    """Stop worker nodes of this stack that outlived whoever started them (a killed test or benchmark).

    They carry ``ICD_STACK_ID=<stack id>/node-<i>`` in their environment, so they are found without
    a record and nothing of another stack or of the head is touched. Returns their indices.
    """
    import psutil

    from icd.stack.processes import STACK_ID_VAR

    prefix, found = f"{settings.stack_id}/node-", {}
    for proc in psutil.process_iter():
        try:
            tag = proc.environ().get(STACK_ID_VAR, "")
        except psutil.Error:
            continue
        if tag.startswith(prefix):
            found.setdefault(int(tag[len(prefix):]), []).append(proc)
    terminate([proc for procs in found.values() for proc in procs], grace_s=grace_s)
    return sorted(found)


@contextlib.contextmanager
def worker_nodes(settings: StackSettings, count: int = 2, num_cpus: float = 1,
                 object_store_mb: int = 256) -> Iterator[list[WorkerNode]]:
    """``count`` worker nodes for the block; all of them stopped afterwards, also after an exception."""
    nodes: list[WorkerNode] = []
    try:
        for index in range(count):
            nodes.append(start_node(settings, index, num_cpus, object_store_mb))
        yield nodes
    finally:
        for node in nodes:
            stop_node(node)
