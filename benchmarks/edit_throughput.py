"""Edits per second against what the hardware allows: the bound, the in-process editor, the served editor.

    python benchmarks/edit_throughput.py [--manifest s3://.../manifest.json] [--repeats 5]

One run, side by side, on one thread (a CPU Serve replica has one CPU, and Ray gives its
actors OMP_NUM_THREADS = num_cpus):
  (a) the bound: the work of an edit with no adapter code and no pictures: the prompts through
      the text encoder, VAE encode, the forward + reverse UNet passes on a plain UNet, VAE
      decode, all at the batch size; and the same without the text encoder (`_cached_prompts`),
      the floor for a replica whose prompt cache holds the prompts (this benchmark repeats them);
  (b) the in-process editor as a replica runs it (`EditPipeline.for_serving`: LoRA fused per
      direction, prompt cache, inference mode) on pictures, at batch 1 and 8; the training
      form (one UNet, adapters switched per call) alongside, so the fusing shows;
  (c) the served editor over HTTP (`serve_load.py`'s harness): 16 clients with
      max_batch_size 8, and single edits at concurrency 1.
(a) and (b) alternate, each the median of --repeats runs. Stop the stack first on 2 cores
(`icd stack down`): its idle services show up in the timings. Last line:
{"bound_eps_b8": ..., "inprocess_eps_b8": ..., "served_rps": ..., "inprocess_over_bound": ...,
 "served_over_inprocess": ..., "latency_b1_ms": ..., "bound_b1_ms": ...}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `serve` and `benchmarks` at the repo root

SOURCE, TARGET = "a red circle on a blue background", "a green circle on a blue background"


def bound_edit(pipeline, pixels, n: int, context=None) -> None:
    """The bare work of n edits: text encoding (unless ``context`` is given), VAE encode, 2 x steps plain
    UNet passes, VAE decode."""
    import torch

    bundle = pipeline.bundle
    unet = next(iter(bundle.directions.values()))  # a plain UNet (LoRA fused), no adapter code
    tokens = bundle.tokenize([SOURCE] * n + [TARGET] * n)
    w = torch.zeros(n)
    steps = list(pipeline.boundaries.forward_timesteps) + list(pipeline.boundaries.reverse_timesteps)
    with torch.inference_mode():
        if context is None:
            context = bundle.text_encoder(tokens).last_hidden_state
        x = bundle.vae.encode(pixels).latent_dist.mode()
        cond = None
        if bundle.guidance_dim is not None:
            from icd.diffusion.guidance import guidance_embedding
            cond = guidance_embedding(w, bundle.guidance_dim)
        for i, t in enumerate(steps):
            rows = context[:n] if i < len(steps) // 2 else context[n:]
            x = unet(x, torch.full((n,), t), encoder_hidden_states=rows, timestep_cond=cond).sample
        bundle.vae.decode(x)


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="jobs/configs/toy.yaml")
    parser.add_argument("--manifest", help="a stage output's manifest.json (default: the toy base, untrained adapters)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (the median counts)")
    parser.add_argument("--requests", type=int, default=96, help="requests of the served load phase")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--single", type=int, default=20, help="served requests at concurrency 1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("ICD_BENCH_SERVE_PORT", 8124)))
    args = parser.parse_args()

    import ray
    import torch
    from ray import serve

    from benchmarks.serve_load import load, png_b64, start_local_serve, test_image
    from icd.config import load_config
    from icd.editing.pipeline import EditPipeline, decode_batch, invert_batch, to_model_input, to_pictures
    from icd.train.stages import export_untrained, read_stage_manifest
    from serve.app import build_app

    os.environ.setdefault("ICD_BUCKET", "icd")  # the Gateway's latent store needs a name; /v1/invert is not used
    config = load_config(args.config)
    manifest = (read_stage_manifest(args.manifest) if args.manifest
                else export_untrained(config, "edit-throughput", tempfile.mkdtemp(prefix="edit-throughput-")))
    images = [test_image(i) for i in range(max(args.requests, args.single, 8))]

    torch.set_num_threads(1)
    training_form = EditPipeline.from_manifest(manifest, config.editing, config.model.resolution)
    served_form = training_form.for_serving(config.serving)
    memory = served_form.memory()

    def editor(pipeline, n: int):
        def run():  # what `Editor.edits` does for a batch of n switch edits, pictures in and out
            batch = images[:n]
            inverted = invert_batch(pipeline, batch, [SOURCE] * n, list(range(n)))
            out = decode_batch(pipeline, inverted.latents, [TARGET] * n, [config.editing.guidance] * n,
                               [config.editing.tau] * n)
            to_pictures(out.images, [im.size for im in batch])
        return run

    seconds = {}
    for n in (1, 8):
        pixels = to_model_input(images[:n], config.model.resolution)
        with torch.inference_mode():
            context = served_form.bundle.text_encoder(
                served_form.bundle.tokenize([SOURCE] * n + [TARGET] * n)).last_hidden_state
        candidates = {"bound": lambda: bound_edit(served_form, pixels, n),
                      "bound_cached_prompts": lambda: bound_edit(served_form, pixels, n, context),
                      "inprocess": editor(served_form, n), "training_form": editor(training_form, n)}
        rounds = {name: [] for name in candidates}
        for _ in range(args.repeats):  # alternate, so drifts of the machine hit every candidate alike
            for name, fn in candidates.items():
                rounds[name].append(timed(fn, 1))
        for name, values in rounds.items():
            seconds[f"{name}_b{n}"] = statistics.median(values)
    del training_form, served_form

    # (c) Local Ray and Serve in this process, as serve_load.py runs them.
    url = start_local_serve(args.port)
    uri = args.manifest or manifest["output"] + "/manifest.json"
    bodies = [{"image": png_b64(image), "source_prompt": SOURCE, "target_prompt": TARGET, "seed": i}
              for i, image in enumerate(images)]
    try:
        serve.run(build_app({"model_uri": uri, "editor_options": {"user_config": {
            "model_uri": uri, "max_batch_size": 8}}}), name="icd", route_prefix="/")
        load(url, bodies[:8], 8)  # warm-up
        _, single_ms, answers = load(url, bodies[:args.single], 1)
        served_rps, _, _ = load(url, bodies[:args.requests], args.clients)
    finally:
        serve.shutdown()
        ray.shutdown()

    eps = {key: (1 if key.endswith("b1") else 8) / value for key, value in seconds.items()}
    print("edits/s: " + ", ".join(f"{k} {v:.2f}" for k, v in eps.items()))
    print(f"served: {served_rps:.2f} req/s at {args.clients} clients; concurrency 1: "
          f"{statistics.median(single_ms):.1f} ms (median of {args.single}); nfe {answers[0]['nfe']}")
    print("replica weights (MB): " + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in memory.items()))
    result = {
        "bound_eps_b8": round(eps["bound_b8"], 2),
        "inprocess_eps_b8": round(eps["inprocess_b8"], 2),
        "training_form_eps_b8": round(eps["training_form_b8"], 2),
        "served_rps": round(served_rps, 2),
        "bound_cached_prompts_eps_b8": round(eps["bound_cached_prompts_b8"], 2),
        "inprocess_over_bound": round(eps["inprocess_b8"] / eps["bound_b8"], 3),
        "inprocess_over_bound_cached_prompts": round(eps["inprocess_b8"] / eps["bound_cached_prompts_b8"], 3),
        "served_over_inprocess": round(served_rps / eps["inprocess_b8"], 3),
        "latency_b1_ms": round(statistics.median(single_ms), 1),
        "inprocess_b1_ms": round(seconds["inprocess_b1"] * 1000, 1),
        "bound_b1_ms": round(seconds["bound_b1"] * 1000, 1),
        "bound_cached_prompts_b1_ms": round(seconds["bound_cached_prompts_b1"] * 1000, 1),
        "weights_mb": round(memory["total"] / 2**20, 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
