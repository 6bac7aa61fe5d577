"""Inverted latents in object storage: the handles behind "invert once, edit many".

A handle is the sha256 of the latents and their metadata, so the same image, prompt, seed and
model give the same id, and writing it again renews it. Each handle lives ``ttl_s`` seconds from
its last write (the object's modification time in S3): a read after that answers 404, and
``sweep`` deletes what has expired. ``Gateway`` sweeps at most every ``sweep_every_s`` from a
worker thread after an inversion, so a store that is written is also cleaned.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import timezone

DEFAULT_TTL_S = 24 * 3600.0


class LatentError(Exception):
    """A handle that is malformed (422), unknown or expired (404)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def content_id(latents, meta: dict[str, str]) -> str:
    """sha256 of the latents (dtype, shape, bytes) and the sorted metadata.

    Not of the safetensors file: safetensors writes its metadata in no fixed order, so the same
    latents would get a different file (and id) from one write to the next.
    """
    import torch

    digest = hashlib.sha256(f"{latents.dtype}{tuple(latents.shape)}".encode())
    digest.update(latents.reshape(-1).view(torch.uint8).numpy().tobytes())
    digest.update(json.dumps(meta, sort_keys=True).encode())
    return digest.hexdigest()


def check_id(latent_id: str) -> str:
    if len(latent_id) != 64 or any(c not in "0123456789abcdef" for c in latent_id):
        raise LatentError(422, "expected the 64-hex-digit id returned by /v1/invert")
    return latent_id


class LatentStore:
    """``put`` / ``get`` / ``delete`` / ``sweep`` of latents under ``prefix`` (``s3://…`` or a local dir)."""

    def __init__(self, prefix: str | None = None, ttl_s: float = DEFAULT_TTL_S, sweep_every_s: float | None = None,
                 clock: Callable[[], float] = time.time, settings=None):
        from icd.storage import S3Settings

        if not ttl_s > 0:
            raise ValueError(f"latent_ttl_s: expected seconds > 0, got {ttl_s!r}")
        self.settings = settings or S3Settings.from_env()
        self.prefix = (prefix or self.settings.uri("serve/latents")).rstrip("/")
        self.ttl_s = float(ttl_s)
        # A sweep lists the whole prefix: often enough that little outlives its TTL by much.
        self.sweep_every_s = float(sweep_every_s if sweep_every_s is not None else min(3600.0, ttl_s / 4))
        self.clock = clock
        self._last_sweep = float("-inf")
        self._sweeping = threading.Lock()

    def _path(self, latent_id: str):
        from icd.storage import filesystem_for

        return filesystem_for(f"{self.prefix}/{latent_id}.safetensors", self.settings)

    def put(self, latents, meta: dict) -> str:
        from safetensors.torch import save

        meta = {k: str(v) for k, v in meta.items()}
        latents = latents.detach().cpu().contiguous()
        blob = save({"latents": latents}, metadata=meta)
        latent_id = content_id(latents, meta)
        fs, path = self._path(latent_id)
        with fs.open_output_stream(path) as f:
            f.write(blob)
        return latent_id

    def _expired(self, mtime) -> bool:
        if mtime is None:  # a store that keeps no modification times: nothing expires
            return False
        if mtime.tzinfo is None:  # pyarrow gives naive datetimes in UTC
            mtime = mtime.replace(tzinfo=timezone.utc)
        return self.clock() - mtime.timestamp() > self.ttl_s

    def get(self, latent_id: str) -> tuple:
        """(latents, metadata); ``LatentError`` 404 when unknown or past its TTL (then it is deleted)."""
        import pyarrow.fs as pafs
        from safetensors import safe_open
        from safetensors.torch import load

        fs, path = self._path(check_id(latent_id))
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            raise LatentError(404, f"unknown latent id {latent_id}")
        if self._expired(info.mtime):
            self._delete_path(fs, path)
            raise LatentError(404, f"latent id {latent_id} expired (kept {self.ttl_s:.0f} s): invert again")
        with fs.open_input_stream(path) as f:
            blob = f.read()
        with tempfile.NamedTemporaryFile(suffix=".safetensors") as tmp:  # safe_open reads metadata from a file
            tmp.write(blob)
            tmp.flush()
            with safe_open(tmp.name, "pt") as handle:
                meta = handle.metadata() or {}
        return load(blob)["latents"], meta

    def delete(self, latent_id: str) -> None:
        """Delete a handle now; ``LatentError`` 404 when there is none."""
        import pyarrow.fs as pafs

        fs, path = self._path(check_id(latent_id))
        if fs.get_file_info(path).type != pafs.FileType.File:
            raise LatentError(404, f"unknown latent id {latent_id}")
        self._delete_path(fs, path)

    @staticmethod
    def _delete_path(fs, path: str) -> None:
        try:
            fs.delete_file(path)
        except FileNotFoundError:
            pass  # deleted meanwhile by another replica's sweep

    def sweep(self) -> int:
        """Delete every expired handle under the prefix; the number deleted."""
        import pyarrow.fs as pafs

        from icd.storage import filesystem_for

        fs, root = filesystem_for(self.prefix, self.settings)
        try:
            infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
        except FileNotFoundError:
            return 0
        deleted = 0
        for info in infos:
            if info.type == pafs.FileType.File and info.path.endswith(".safetensors") and self._expired(info.mtime):
                self._delete_path(fs, info.path)
                deleted += 1
        return deleted

    def sweep_if_due(self) -> int | None:
        """``sweep`` when ``sweep_every_s`` has passed since the last one (one at a time); else None."""
        if self.clock() - self._last_sweep < self.sweep_every_s or not self._sweeping.acquire(blocking=False):
            return None
        try:
            self._last_sweep = self.clock()
            return self.sweep()
        finally:
            self._sweeping.release()
