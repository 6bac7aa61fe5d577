"""Images/s of the Ray Data pipeline against a plain single-process loop, on the same shards.

    eval "$(.venv/bin/icd stack env)"
    python benchmarks/data_throughput.py [--count 4000] [--size 512] [--resolution 256]

Both read the same LAION-format shards from the stack's S3 (LAION-like 512 px JPEGs of
the shapes world with photo-like noise) and do the same work per sample: filter, decode,
RGB, resize + centre crop, [-1, 1], CLIP tokens. The Ray side is what training uses
(`preprocess_shards`: read tasks fetch tars, an actor pool splits and preprocesses them) on a
local Ray with all cores. Throughput is the steady state, from each side's first batch on: the
Ray side's start-up (worker processes, actors building the tokenizer: seconds, once per run)
is reported apart, with the end-to-end ratio that includes it.
Last line: {"ray_images_per_s": ..., "baseline_images_per_s": ..., "ratio": ...,
            "ray_startup_s": ..., "end_to_end_ratio": ...}
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time

import numpy as np
from PIL import Image

from icd.data.reader import PreprocessOptions, Preprocessor, list_files, preprocess_shards
from icd.data.shapes import render, sample_spec
from icd.data.shards import ShardSample, iter_tar_samples, write_dataset
from icd.storage import S3Settings


def photo_like_samples(count: int, size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for i in range(count):
        spec = sample_spec(rng)
        pixels = render(spec, size=size).image.astype(np.float32) + rng.normal(0, 12, (size, size, 3))
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        yield ShardSample(f"{i:09d}", buffer.getvalue(), "jpg", spec.caption, {"width": size, "height": size})


class Clock:
    """Counts images and notes when the first batch came out, for steady-state and end-to-end rates."""

    def __init__(self):
        self.start, self.first, self.first_count, self.count = time.time(), None, 0, 0

    def add(self, n: int) -> None:
        if self.first is None:
            self.first, self.first_count = time.time(), n
        self.count += n

    def stop(self) -> None:
        self.end = time.time()

    @property
    def steady(self) -> float:
        return (self.count - self.first_count) / (self.end - self.first)

    @property
    def overall(self) -> float:
        return self.count / (self.end - self.start)


def baseline(uri: str, options: PreprocessOptions, batch_size: int) -> Clock:
    """The same per-sample work in one process: read each tar, preprocess, tokenise per batch."""
    clock = Clock()
    worker = Preprocessor(options)
    fs, tars = list_files(uri, ".tar")
    for tar in tars:
        with fs.open_input_stream(tar) as f:
            samples = [s for s in iter_tar_samples(f.read()) if s != "truncated"]
        for lo in range(0, len(samples), batch_size):
            chunk = samples[lo:lo + batch_size]
            batch = {"key": [s.key for s in chunk], "image": [s.image for s in chunk],
                     "caption": [s.caption for s in chunk], "meta": [json.dumps(s.meta) for s in chunk]}
            clock.add(len(worker(batch)["key"]))
    clock.stop()
    return clock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=4000)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--per-shard", type=int, default=250)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    import ray

    settings = S3Settings.from_env()
    uri = settings.uri(f"datasets/bench-throughput-{args.count}-{args.size}")
    if not dataset_complete(uri):
        start = time.time()
        write_dataset(photo_like_samples(args.count, args.size), uri, args.per_shard, settings)
        print(f"wrote {args.count} images to {uri} in {time.time() - start:.0f}s", flush=True)
    options = PreprocessOptions(resolution=args.resolution, crop="center")

    plain = baseline(uri, options, args.batch_size)
    print(f"plain loop: {plain.count} images in {plain.end - plain.start:.1f}s", flush=True)

    cpus = os.cpu_count() or 2
    ray.init(address="local", num_cpus=cpus, object_store_memory=1024 * 1024 * 1024, include_dashboard=False,
             log_to_driver=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    clock = Clock()
    ds = preprocess_shards(uri, options, actors=cpus, cpus_per_actor=(cpus - 0.5) / cpus, batch_size=args.batch_size)
    for batch in ds.iter_batches(batch_size=args.batch_size, batch_format="numpy"):
        clock.add(len(batch["key"]))
    clock.stop()
    print(f"Ray Data ({cpus} actors): {clock.count} images in {clock.end - clock.start:.1f}s, the first batch "
          f"after {clock.first - clock.start:.1f}s", flush=True)
    ray.shutdown()
    if clock.count != plain.count:
        raise SystemExit(f"the two pipelines disagree: {clock.count} vs {plain.count} images")
    result = {"ray_images_per_s": round(clock.steady, 1), "baseline_images_per_s": round(plain.steady, 1),
              "ratio": round(clock.steady / plain.steady, 2), "ray_startup_s": round(clock.first - clock.start, 1),
              "end_to_end_ratio": round(clock.overall / plain.overall, 2)}
    print(json.dumps(result))


def dataset_complete(uri: str) -> bool:
    """Whether a complete copy of the dataset (its _stats.json is written last) is already there."""
    from icd.storage import read_json

    return read_json(f"{uri}/_stats.json") is not None


if __name__ == "__main__":
    main()
