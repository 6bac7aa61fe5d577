"""Serve under load on the toy preset, over HTTP: batching gain, latency, HTTP overhead.

    python benchmarks/serve_load.py [--manifest s3://.../manifest.json] [--requests 96]

Ray and Serve run locally in this process; the stack is not needed (with `--manifest s3://...`,
`eval "$(icd stack env)"` first). On 2 cores, an idle stack's Ray head, MLflow and S3 server
cost enough CPU to show up in the latencies: stop it for this benchmark (`icd stack down`).

One run, side by side: (1) the in-process edit latency of the same pipeline (one thread, as
the replica has one CPU); (2) the served `/v1/edit` latency at concurrency 1 with batching on;
(3) throughput and latency at 16 concurrent clients with `max_batch_size` 8, then 1 (the same
replica, reconfigured in place through `user_config`). Last line:
{"batched_rps": ..., "unbatched_rps": ..., "batching_gain": ..., "p50_ms": ..., "p99_ms": ...,
 "http_overhead": ..., "edit_nfe": ...}
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the `serve` app package at the repo root

SOURCE, TARGET = "a red circle on a blue background", "a green circle on a blue background"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def test_image(seed: int):
    """A 64-px shapes-world picture (served edits accept any size; the model works at 32 px)."""
    from PIL import Image

    from icd.data.shapes import random_sample

    return Image.fromarray(random_sample(seed).image).resize((64, 64))


def png_b64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def load(url: str, bodies: list[dict], clients: int) -> tuple[float, list[float], list[dict]]:
    """Send every body with ``clients`` concurrent clients: (requests/s, latencies in ms, responses)."""
    import requests

    def one(body):
        started = time.perf_counter()
        response = requests.post(f"{url}/v1/edit", json=body, timeout=600)
        response.raise_for_status()
        return (time.perf_counter() - started) * 1000, response.json()

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, bodies))
    elapsed = time.perf_counter() - started
    return len(bodies) / elapsed, [r[0] for r in results], [r[1] for r in results]


def start_local_serve(port: int) -> str:
    """Ray and Serve local to this process (not the stack head's; RAY_ADDRESS from `icd stack env` is for
    job clients); returns the HTTP proxy's URL."""
    import ray
    from ray import serve

    for key in [k for k in os.environ if k.startswith("RAY_")]:
        os.environ.pop(key)
    ray.init(address="local", num_cpus=2, object_store_memory=300 * 1024 * 1024, include_dashboard=False,
             log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="jobs/configs/toy.yaml")
    parser.add_argument("--manifest", help="a stage output's manifest.json (default: a fresh toy model)")
    parser.add_argument("--requests", type=int, default=96, help="requests per load phase")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--single", type=int, default=20, help="requests at concurrency 1 (and in-process edits)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("ICD_BENCH_SERVE_PORT", 8123)))
    args = parser.parse_args()

    import ray
    import torch
    from ray import serve

    from icd.config import load_config
    from icd.editing.pipeline import EditPipeline
    from icd.train.stages import export_untrained, read_stage_manifest
    from serve.app import build_app

    # The Gateway's latent store needs a bucket name; /v1/invert (the only writer) is not exercised here.
    os.environ.setdefault("ICD_BUCKET", "icd")
    config = load_config(args.config)
    manifest = (read_stage_manifest(args.manifest) if args.manifest
                else export_untrained(config, "serve-load", tempfile.mkdtemp(prefix="serve-load-")))
    images = [test_image(i) for i in range(max(args.requests, args.single))]
    bodies = [{"image": png_b64(image), "source_prompt": SOURCE, "target_prompt": TARGET, "guidance": 7.0,
               "seed": i} for i, image in enumerate(images)]

    # (1) In process, one thread: what the replica does per request without HTTP, queues or batching.
    torch.set_num_threads(1)
    pipeline = EditPipeline.from_manifest(manifest, config.editing, config.model.resolution)
    pipeline.edit([images[0]], [SOURCE], [TARGET])  # warm-up
    inproc_ms = []
    for image in images[:args.single]:
        started = time.perf_counter()
        pipeline.edit([image], [SOURCE], [TARGET], guidance=7.0)
        inproc_ms.append((time.perf_counter() - started) * 1000)
    del pipeline

    url = start_local_serve(args.port)
    uri = args.manifest or manifest["output"] + "/manifest.json"

    def deploy(max_batch_size: int) -> None:
        serve.run(build_app({"model_uri": uri, "editor_options": {"user_config": {
            "model_uri": uri, "max_batch_size": max_batch_size}}}), name="icd", route_prefix="/")

    try:
        deploy(8)
        load(url, bodies[:4], 4)  # warm-up: replicas, batch queues, the latent store
        # (2) Served at concurrency 1.
        _, single_ms, answers = load(url, bodies[:args.single], 1)
        # (3) 16 clients with max_batch_size 8, then 1.
        batched_rps, batched_ms, _ = load(url, bodies[:args.requests], args.clients)
        deploy(1)
        load(url, bodies[:2], 2)
        unbatched_rps, _, _ = load(url, bodies[:args.requests], args.clients)
    finally:
        serve.shutdown()
        ray.shutdown()

    result = {
        "batched_rps": round(batched_rps, 3),
        "unbatched_rps": round(unbatched_rps, 3),
        "batching_gain": round(batched_rps / unbatched_rps, 3),
        "p50_ms": round(percentile(batched_ms, 50), 1),
        "p99_ms": round(percentile(batched_ms, 99), 1),
        "http_overhead": round(statistics.median(single_ms) / statistics.median(inproc_ms), 3),
        "edit_nfe": answers[0]["nfe"],
    }
    print(f"in-process edit {statistics.median(inproc_ms):.1f} ms, served at concurrency 1 "
          f"{statistics.median(single_ms):.1f} ms (median of {args.single})")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
