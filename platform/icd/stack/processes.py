"""Start, find and stop the stack's server processes by recorded PID.

A record keeps the PID *and* the process's start time, so a PID reused by an unrelated
process after a reboot is never mistaken for ours, and ``down`` never signals it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

# Set in the environment of every server the stack starts; children inherit it.
STACK_ID_VAR = "ICD_STACK_ID"


@dataclass
class ProcessRecord:
    name: str
    pid: int
    create_time: float
    command: list[str]
    log: str

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "ProcessRecord | None":
        try:
            return cls(**json.loads(path.read_text()))
        except (FileNotFoundError, json.JSONDecodeError, TypeError):
            return None

    def process(self) -> psutil.Process | None:
        """The live process this record names, or None if it has exited or the PID was reused."""
        try:
            proc = psutil.Process(self.pid)
            if abs(proc.create_time() - self.create_time) > 0.05 or proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except psutil.Error:
            return None


def spawn(name: str, command: list[str], env: dict[str, str], log_path: Path, cwd: Path) -> ProcessRecord:
    """Start ``command`` detached (own session, so a Ctrl-C in the caller does not reach it)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {name}\n".encode())
        log.flush()
        popen = subprocess.Popen(
            command, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return ProcessRecord(name=name, pid=popen.pid, create_time=psutil.Process(popen.pid).create_time(),
                         command=command, log=str(log_path))


def family(root: psutil.Process | None, stack_id: str) -> list[psutil.Process]:
    """``root`` with its descendants, plus every process that carries ``ICD_STACK_ID=stack_id``.

    The stack starts its servers with that variable in their environment and every child
    inherits it, so this also finds processes that outlived their parent and were
    re-parented to init (e.g. Ray workers of a raylet that already exited), whose command
    lines Ray rewrites to titles such as ``ray::DashboardAgent``.
    """
    members: dict[int, psutil.Process] = {}
    if root is not None:
        members[root.pid] = root
        try:
            members.update((child.pid, child) for child in root.children(recursive=True))
        except psutil.Error:
            pass
    for proc in psutil.process_iter():
        if proc.pid in members:
            continue
        try:
            if proc.environ().get(STACK_ID_VAR) == stack_id:
                members[proc.pid] = proc
        except psutil.Error:
            continue
    members.pop(os.getpid(), None)
    return list(members.values())


def terminate(processes: list[psutil.Process], grace_s: float = 15.0) -> list[psutil.Process]:
    """SIGTERM all, wait up to ``grace_s``, SIGKILL the rest; returns any that still live."""
    for proc in processes:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(alive, timeout=5)
    return [p for p in alive if not _is_zombie(p)]


def _is_zombie(proc: psutil.Process) -> bool:
    # A zombie has exited and only waits for its parent to reap it.
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could listen on ``host:port`` now (TIME_WAIT leftovers don't count)."""
    family_ = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family_, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def port_owner(port: int) -> str:
    """A short description of who listens on ``port``, when the OS lets us see it."""
    try:
        for conn in psutil.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                try:
                    return f"{psutil.Process(conn.pid).name()} (pid {conn.pid})"
                except psutil.Error:
                    return f"pid {conn.pid}"
    except psutil.Error:
        pass
    return "another process"


def log_tail(path: str | Path, lines: int = 8) -> str:
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return ""
    return "\n".join(text[-lines:])
