"""The LAION / img2dataset shard format: write it, and read it back tolerantly.

A shard is ``{shard:05d}.tar`` (webdataset: ``{key}.jpg|png``, ``{key}.txt`` caption,
``{key}.json`` metadata with url, caption, width, height and, when known, similarity,
pwatermark, punsafe) plus ``{shard:05d}.parquet`` with the same metadata, one row per key.
A dataset directory also holds ``_stats.json``.

Reading never fails on one bad member: real LAION tars have duplicate keys and broken
members. A truncated tar yields the samples before the damage and a ``truncated`` record.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
METADATA_FIELDS = ("key", "url", "caption", "width", "height", "similarity", "pwatermark", "punsafe")


@dataclass
class ShardSample:
    key: str
    image: bytes | None
    image_ext: str | None
    caption: str | None
    meta: dict[str, Any] = field(default_factory=dict)


def shard_name(index: int, suffix: str) -> str:
    return f"{index:05d}.{suffix}"


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # reproducible shards
    tar.addfile(info, io.BytesIO(data))


def write_shard(samples: list[ShardSample], tar_stream, parquet_stream) -> int:
    """Write one shard's tar and parquet to open binary streams; returns the sample count."""
    rows = []
    with tarfile.open(fileobj=tar_stream, mode="w") as tar:
        for sample in samples:
            meta = {"key": sample.key, "caption": sample.caption, **sample.meta}
            if sample.image is not None:
                _add_member(tar, f"{sample.key}.{sample.image_ext}", sample.image)
            if sample.caption is not None:
                _add_member(tar, f"{sample.key}.txt", sample.caption.encode("utf-8"))
            _add_member(tar, f"{sample.key}.json", json.dumps(meta).encode("utf-8"))
            rows.append({name: meta.get(name) for name in METADATA_FIELDS})
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("key", pa.string()), ("url", pa.string()), ("caption", pa.string()), ("width", pa.int64()),
        ("height", pa.int64()), ("similarity", pa.float64()), ("pwatermark", pa.float64()), ("punsafe", pa.float64()),
    ]))
    pq.write_table(table, parquet_stream)
    return len(rows)


def iter_tar_samples(data: bytes) -> Iterator[ShardSample | str]:
    """Group a tar's members by key into samples; yields ``"truncated"`` if the tar is cut short.

    Members of one key are adjacent in img2dataset tars; a duplicate key later in the file
    starts a new sample (it is yielded again, not merged).
    """
    current: dict[str, bytes] = {}
    current_key: str | None = None

    def flush() -> ShardSample | None:
        if current_key is None:
            return None
        image_ext = next((e for e in IMAGE_EXTENSIONS if e in current), None)
        caption = current.get("txt")
        meta: dict[str, Any] = {}
        if "json" in current:
            try:
                meta = json.loads(current["json"])
            except (ValueError, UnicodeDecodeError):
                meta = {"_bad_json": True}
        text = caption.decode("utf-8", errors="replace") if caption is not None else meta.get("caption")
        return ShardSample(current_key, current.get(image_ext) if image_ext else None, image_ext, text, meta)

    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = member.name.rsplit("/", 1)[-1]
                key, _, ext = base.partition(".")
                ext = ext.lower()
                payload = tar.extractfile(member).read()
                if len(payload) != member.size:
                    raise tarfile.ReadError(f"member {member.name} truncated")
                if key != current_key or ext in current:
                    sample = flush()
                    if sample is not None:
                        yield sample
                    current, current_key = {}, key
                current[ext] = payload
    except (tarfile.TarError, EOFError, OSError):
        sample = flush()
        if sample is not None:
            yield sample
        yield "truncated"
        return
    sample = flush()
    if sample is not None:
        yield sample


def write_dataset(samples, uri: str, per_shard: int, settings=None, progress=None) -> dict:
    """Write samples as ``00000.tar`` + ``00000.parquet``, ... and ``_stats.json`` under ``uri``.

    ``samples`` is any iterable of `ShardSample`; ``progress`` (e.g. a tqdm bar) is advanced
    per sample. Each shard is fully written before the next starts, so an interrupted run
    leaves whole shards only (and no ``_stats.json``, which is written last).
    """
    import tempfile

    from icd.storage import filesystem_for

    if per_shard < 1:
        raise ValueError(f"per_shard must be >= 1, got {per_shard}")
    fs, root = filesystem_for(uri, settings)
    fs.create_dir(root, recursive=True)
    shard, total, batch = 0, 0, []

    def flush():
        nonlocal shard, total
        with tempfile.TemporaryFile() as tar_tmp, tempfile.TemporaryFile() as pq_tmp:
            total += write_shard(batch, tar_tmp, pq_tmp)
            for tmp, suffix in ((tar_tmp, "tar"), (pq_tmp, "parquet")):
                tmp.seek(0)
                with fs.open_output_stream(f"{root}/{shard_name(shard, suffix)}") as out:
                    while chunk := tmp.read(1 << 20):
                        out.write(chunk)
        shard += 1
        batch.clear()

    for sample in samples:
        batch.append(sample)
        if progress is not None:
            progress.update(1)
        if len(batch) == per_shard:
            flush()
    if batch:
        flush()
    stats = {"count": total, "shards": shard, "per_shard": per_shard}
    with fs.open_output_stream(f"{root}/_stats.json") as out:
        out.write(json.dumps(stats).encode())
    return stats
