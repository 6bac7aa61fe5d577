"""One trainer per stage output in a cluster: a named Ray actor is the lock.

Registering an actor name is atomic in the GCS, so of two drivers that try to train the same stage
output at once (two identical DAG submissions) exactly one gets the name and trains; the other
waits and then finds the finished output. The actor belongs to the driver that made it and dies
with it, so a crashed driver leaves no stale lock behind.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator

import ray

NAMESPACE = "icd-locks"


@ray.remote(num_cpus=0)
class StageLock:
    def __init__(self, holder: str):
        self.holder = holder

    def who(self) -> str:
        return self.holder


def lock_name(output: str) -> str:
    return f"stage:{output}"


@contextlib.contextmanager
def stage_lock(output: str, timeout_s: float = 24 * 3600, poll_s: float = 2.0, say=print,
               activity: str = "trained") -> Iterator[bool]:
    """Hold the lock on ``output`` (a stage output, or a model's registration) for the block; yields True if
    another driver held it first. ``activity`` words the waiting message ("being <activity> by another job")."""
    name, waited, deadline = lock_name(output), False, time.monotonic() + timeout_s
    holder = f"pid {os.getpid()} on {socket.gethostname()}"
    while True:
        try:
            lock = StageLock.options(name=name, namespace=NAMESPACE).remote(holder)
            ray.get(lock.who.remote())
            break
        except ValueError:  # the name is taken: someone trains this output now
            if not waited:
                with contextlib.suppress(Exception):
                    other = ray.get(ray.get_actor(name, namespace=NAMESPACE).who.remote(), timeout=10)
                    say(f"{output}: being {activity} by another job ({other}); waiting for it")
                waited = True
            if time.monotonic() > deadline:
                raise TimeoutError(f"{output}: still locked by another job after {timeout_s:.0f} s") from None
            time.sleep(poll_s)
    try:
        yield waited
    finally:
        with contextlib.suppress(Exception):
            ray.kill(lock)
