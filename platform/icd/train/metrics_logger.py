"""Rank 0's metrics and image grids for the stage's MLflow run, sent from a background thread.

Training never waits on MLflow: a call queues its payload and returns; one daemon thread sends
the queue in order. When the server does not answer (restarting, a network cut), payloads stay
queued and the thread retries every ``retry_s``; one warning says so, and one line says how many
were sent once it answers again. Beyond ``max_queued`` payloads the oldest are dropped (counted,
reported once), so a long outage costs memory of bounded size, never the training.
"""

from __future__ import annotations

import collections
import threading
import time
import warnings

import numpy as np


class MetricsLogger:
    def __init__(self, uri: str, run_id: str, max_queued: int = 20_000, retry_s: float = 5.0, client=None):
        import mlflow

        self.client = client or mlflow.MlflowClient(uri)
        self.run_id, self.max_queued, self.retry_s = run_id, max_queued, retry_s
        self._queue: collections.deque = collections.deque()
        self._lock = threading.Condition()
        self._closed = False
        self._sending = False  # a payload is out (taken from the queue, not yet acknowledged)
        self.dropped = 0
        self.failures = 0  # failed sends since the last success
        self._warned = False
        self._thread = threading.Thread(target=self._run, name="mlflow-metrics", daemon=True)
        self._thread.start()

    # --- what the training loop calls (never blocks on the network) --------------------------

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._put(("metrics", [Metric(k, float(v), now, step) for k, v in metrics.items()]))

    def log_image(self, image: np.ndarray, key: str, step: int) -> None:
        self._put(("image", (image, key, step)))

    def flush(self, timeout_s: float = 60.0) -> bool:
        """Wait until everything queued was sent; False if ``timeout_s`` passed first."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._queue or self._sending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._lock.wait(min(remaining, 0.5))
        return True

    def close(self, timeout_s: float = 60.0) -> None:
        """Send what is queued (up to ``timeout_s``) and stop; what could not be sent is reported."""
        sent = self.flush(timeout_s)
        with self._lock:
            self._closed = True
            left = len(self._queue)
            self._lock.notify_all()
        if not sent and left:
            warnings.warn(f"MLflow run {self.run_id}: {left} metric/image payload(s) not sent (the tracking "
                          "server did not answer); the training itself is complete", RuntimeWarning, stacklevel=2)

    @property
    def queued(self) -> int:
        with self._lock:
            return len(self._queue)

    # --- the sender ----------------------------------------------------------------------------

    def _put(self, payload) -> None:
        with self._lock:
            if len(self._queue) >= self.max_queued:
                self._queue.popleft()
                self.dropped += 1
                if self.dropped == 1:
                    warnings.warn(f"MLflow run {self.run_id}: more than {self.max_queued} payloads queued while the "
                                  "tracking server is unreachable; dropping the oldest", RuntimeWarning, stacklevel=3)
            self._queue.append(payload)
            self._lock.notify_all()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._lock.wait()
                if self._closed:  # close() flushed first; whatever is left stays unsent
                    return
                payload = self._queue[0]
                self._sending = True
            try:
                self._send(payload)
            except Exception as exc:  # the server is down or refused: keep the payload, retry later
                self._failed(exc)
                with self._lock:
                    self._sending = False
                    self._lock.notify_all()
                    retry_at = time.monotonic() + self.retry_s
                    while not self._closed and time.monotonic() < retry_at:  # new payloads do not hurry it
                        self._lock.wait(retry_at - time.monotonic())
                continue
            with self._lock:
                if self._queue and self._queue[0] is payload:
                    self._queue.popleft()
                self._sending = False
                self._lock.notify_all()
            if self.failures:
                print(f"MLflow run {self.run_id}: the tracking server answers again after {self.failures} failed "
                      f"send(s); {len(self._queue) + 1} queued payload(s) sent or being sent", flush=True)
                self.failures = 0

    def _send(self, payload) -> None:
        kind, body = payload
        if kind == "metrics":
            self.client.log_batch(self.run_id, metrics=body)
        else:
            image, key, step = body
            self.client.log_image(self.run_id, image, key=key, step=step)

    def _failed(self, exc: Exception) -> None:
        self.failures += 1
        if not self._warned:
            self._warned = True
            warnings.warn(f"MLflow run {self.run_id}: the tracking server did not take metrics "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); training "
                          f"goes on, metrics are queued and sent when it answers (retry every {self.retry_s:g} s)",
                          RuntimeWarning, stacklevel=1)
