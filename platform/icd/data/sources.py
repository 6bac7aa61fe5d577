"""Where shard samples come from: the shapes world, or a folder of real images with captions."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Iterator

from PIL import Image

from icd.data.shapes import random_sample
from icd.data.shards import ShardSample

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def _png(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def shapes_samples(count: int, seed: int = 0) -> Iterator[ShardSample]:
    """``count`` shapes-world images (lossless PNG) from seeds ``seed .. seed + count - 1``."""
    for s in range(seed, seed + count):
        sample = random_sample(s)
        spec = sample.spec
        yield ShardSample(
            key=f"{s:09d}", image=_png(sample.image), image_ext="png", caption=sample.caption,
            meta={"url": f"shapes://{s}", "width": sample.image.shape[1], "height": sample.image.shape[0],
                  "color": spec.color, "shape": spec.shape, "background": spec.background},
        )


def folder_samples(folder: str | Path, captions_csv: str | Path | None = None) -> Iterator[ShardSample]:
    """Images of a folder with a sidecar ``<name>.txt`` caption each, or captions from a CSV
    with columns ``file`` (relative path) and ``caption``. Images without a caption are skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--from-dir {folder} is not a directory")
    captions: dict[str, str] = {}
    if captions_csv is not None:
        with open(captions_csv, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = {"file", "caption"} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"{captions_csv}: expected columns 'file' and 'caption', missing {sorted(missing)}")
            captions = {row["file"]: row["caption"] for row in reader}
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        relative = str(path.relative_to(folder))
        caption = captions.get(relative)
        if caption is None and path.with_suffix(".txt").exists():
            caption = path.with_suffix(".txt").read_text(encoding="utf-8").strip()
        if not caption:
            continue
        data = path.read_bytes()
        try:
            width, height = Image.open(io.BytesIO(data)).size
        except Exception:
            width = height = None  # kept: the reader counts it as corrupt
        ext = path.suffix.lower().lstrip(".").replace("jpeg", "jpg")
        yield ShardSample(key=relative.rsplit(".", 1)[0].replace("/", "_"), image=data, image_ext=ext,
                          caption=caption, meta={"url": f"file://{path}", "width": width, "height": height})
