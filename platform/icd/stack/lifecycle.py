"""``icd stack up | down | status``: bring the local stack up idempotently, stop only what it started."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Callable

from icd.stack.processes import (
    STACK_ID_VAR, ProcessRecord, family, log_tail, port_is_free, port_owner, spawn, terminate,
)
from icd.stack.services import SERVICES, Service
from icd.stack.settings import StackError, StackSettings


@dataclass
class ServiceStatus:
    name: str
    state: str  # "healthy" | "starting/unhealthy" | "stopped"
    pid: int | None
    url: str
    log: str


def _ensure_ray_token(settings: StackSettings) -> None:
    path = settings.ray_auth_token_path
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(secrets.token_hex(32))


def _check_ports(service: Service, settings: StackSettings) -> None:
    for setting, port in service.ports(settings).items():
        if not port_is_free(settings.host, port):
            env_var = setting.split(" ")[0]
            raise StackError(
                f"port {port} ({setting}) on {settings.host} is in use by {port_owner(port)}: "
                f"stop that process or set {env_var} in .env"
            )


def _running(service: Service, settings: StackSettings) -> ProcessRecord | None:
    record = ProcessRecord.load(service.record_path(settings))
    return record if record and record.process() else None


def up(settings: StackSettings, say: Callable[[str], None] = print) -> None:
    """Start every service that is not running, then wait until all are healthy."""
    settings.credentials()  # a missing credential fails before anything starts
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    _ensure_ray_token(settings)

    to_start = [svc for svc in SERVICES if _running(svc, settings) is None]
    for service in to_start:
        _check_ports(service, settings)
    commands = {svc.name: (svc.command(settings), {**svc.env(settings), STACK_ID_VAR: svc.tag(settings)})
                for svc in to_start}

    started: list[Service] = []
    try:
        for service in to_start:
            command, env = commands[service.name]
            record = spawn(service.name, command, env, service.log_path(settings), cwd=settings.state_dir)
            record.save(service.record_path(settings))
            started.append(service)
            say(f"{service.name}: started (pid {record.pid}), log {record.log}")
        deadline = time.monotonic() + settings.health_timeout_s
        for service in SERVICES:
            _wait_healthy(service, settings, deadline)
            say(f"{service.name}: healthy at {service.url(settings)}")
    except BaseException:
        if started:
            say("start-up failed; stopping the services this call started: "
                + ", ".join(s.name for s in started))
            _stop(started, settings)
        raise
    link = settings.state_dir / "logs" / "ray-session"
    if not link.exists():
        link.unlink(missing_ok=True)
        link.symlink_to(settings.ray_temp_dir / "session_latest")


def _wait_healthy(service: Service, settings: StackSettings, deadline: float) -> None:
    while True:
        record = _running(service, settings)
        if record is None:
            log = service.log_path(settings)
            raise StackError(
                f"{service.name} exited during start-up; see {log}. Last lines:\n{log_tail(log)}"
            )
        if service.healthy(settings):
            return
        if time.monotonic() > deadline:
            raise StackError(
                f"{service.name} not healthy after {settings.health_timeout_s:.0f}s "
                f"(ICD_HEALTH_TIMEOUT_S); see {service.log_path(settings)}"
            )
        time.sleep(0.5)


def _stop(services: list[Service], settings: StackSettings) -> list[str]:
    stopped = []
    for service in reversed(services):
        record = ProcessRecord.load(service.record_path(settings))
        root = record.process() if record else None
        members = family(root, service.tag(settings))
        # The root first: each server shuts its own children down in the right order
        # (Ray: raylet, agents, GCS); then whatever is left of the family.
        survivors = terminate([root]) if root else []
        survivors += terminate([p for p in members if p is not root and p.is_running()])
        if survivors:
            raise StackError(
                f"{service.name}: processes {[p.pid for p in survivors]} survived SIGKILL; "
                "check them with `ps` and stop them by hand"
            )
        service.record_path(settings).unlink(missing_ok=True)
        if members:
            stopped.append(service.name)
    return stopped


def stop_services(settings: StackSettings, names: list[str]) -> list[str]:
    """Stop some of the stack's services (``s3``, ``mlflow``, ``ray``) by their records; ``up`` starts them again."""
    by_name = {service.name: service for service in SERVICES}
    unknown = sorted(set(names) - set(by_name))
    if unknown:
        raise StackError(f"unknown service(s) {unknown}; expected some of {sorted(by_name)}")
    return _stop([service for service in SERVICES if service.name in names], settings)


def down(settings: StackSettings, say: Callable[[str], None] = print) -> list[str]:
    """Stop the processes this stack started (by recorded PID and their children); keep the data."""
    from icd.stack.nodes import stop_leftover_nodes

    nodes = stop_leftover_nodes(settings)  # before the head they would try to reconnect to
    for index in nodes:
        say(f"worker node {index}: stopped")
    stopped = _stop(list(SERVICES), settings)
    for name in stopped:
        say(f"{name}: stopped")
    if not stopped and not nodes:
        say("nothing was running")
    return stopped


def status(settings: StackSettings) -> list[ServiceStatus]:
    rows = []
    for service in SERVICES:
        record = _running(service, settings)
        if record is None:
            state = "stopped"
        else:
            try:
                state = "healthy" if service.healthy(settings) else "starting/unhealthy"
            except StackError as exc:
                state = f"unhealthy: {exc}"
        rows.append(ServiceStatus(service.name, state, record.pid if record else None,
                                  service.url(settings), str(service.log_path(settings))))
    return rows
