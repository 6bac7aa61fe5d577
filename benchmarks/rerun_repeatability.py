"""Does a stage trained twice with the same config export the same weights? With and without
`data.preserve_order`.

    eval "$(icd stack env)"
    python benchmarks/rerun_repeatability.py [--stage icd] [--steps 12] [--config jobs/configs/toy.yaml]

Through the stage runner (Ray Train, the preset's workers, outputs in the stack's S3 under a run of
its own): the stages before ``--stage`` are trained once, then ``--stage`` is trained, its exported
weights are read back, its output and checkpoints are deleted and it is trained again; once with
Ray Data delivering blocks in read order and once in completion order (Ray's default). Every draw
inside a step is seeded by (seed, rank, step), so the batches are what can differ. A single-seed
A/B through the path means something only if the first line says identical. The run is deleted
at the end. Last line: {"preserve_order": {"identical": ..., "max_abs_diff": ...}, "completion_order": {...}}.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid

STAGE_CHAIN = ("cfg_distill", "icd", "cycle")


def exported_tensors(manifest: dict, settings) -> dict:
    """Every tensor a stage exported (its UNet or its adapters), read straight from storage."""
    from pyarrow import fs as pafs
    from safetensors.torch import load

    from icd.storage import filesystem_for

    fs, root = filesystem_for(manifest["output"], settings)
    tensors = {}
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if info.path.endswith(".safetensors"):
            with fs.open_input_stream(info.path) as f:
                for name, value in load(f.read()).items():
                    tensors[f"{info.path[len(root):]}:{name}"] = value
    if not tensors:
        raise FileNotFoundError(f"no safetensors under {manifest['output']}")
    return tensors


def max_abs_diff(a: dict, b: dict) -> float:
    if a.keys() != b.keys():
        raise ValueError(f"the two exports hold different tensors: {sorted(a.keys() ^ b.keys())[:4]}")
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def delete_stage(config, stage: str, run: str, settings) -> None:
    """Remove a stage's output and its Ray Train checkpoints, so the same identity trains again."""
    from icd.storage import filesystem_for
    from icd.train.stages import StagePaths

    paths = StagePaths.of(config, stage, run, settings=settings)
    for uri in (paths.output, f"{paths.storage_path}/{paths.trainer_name}"):
        fs, path = filesystem_for(uri, settings)
        fs.delete_dir(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="jobs/configs/toy.yaml")
    parser.add_argument("--stage", choices=STAGE_CHAIN, default="icd")
    parser.add_argument("--steps", type=int, default=12, help="steps of every stage trained")
    args = parser.parse_args()

    import ray

    from icd.config import load_config
    from icd.storage import S3Settings, filesystem_for
    from icd.train.progress import quiet_data_progress
    from icd.train.runner import run_stage

    run = f"repeatability-{uuid.uuid4().hex[:8]}"
    chain = STAGE_CHAIN[:STAGE_CHAIN.index(args.stage) + 1]
    sets = [f"train.{s}.{key}={args.steps}" for s in chain for key in ("steps", "checkpoint_every")]
    sets += [f"train.{s}.export=last" for s in ("icd", "cycle")]  # the choice is not what this measures
    ray.init(address="local", num_cpus=2, object_store_memory=512 * 1024 * 1024, include_dashboard=False,
             log_to_driver=False)
    quiet_data_progress()
    start, result = time.time(), {}
    settings = None
    try:
        for label, preserve in (("preserve_order", True), ("completion_order", False)):
            config = load_config(args.config, [*sets, f"data.preserve_order={str(preserve).lower()}"])
            settings = S3Settings.from_config(config.storage)
            for stage in chain[:-1]:
                run_stage(config, stage, run=run, settings=settings)
            exports = []
            for attempt in range(2):
                manifest = run_stage(config, args.stage, run=run, settings=settings)
                assert not manifest["reused"], "the stage was reused, not retrained"
                exports.append(exported_tensors(manifest, settings))
                delete_stage(config, args.stage, run, settings)
                print(f"[{time.time() - start:.0f}s] {label}: {args.stage} trained ({attempt + 1}/2)", flush=True)
            diff = max_abs_diff(*exports)
            result[label] = {"identical": diff == 0.0, "max_abs_diff": diff}
            print(f"{label}: {args.stage} exported {'identical' if diff == 0 else 'different'} weights "
                  f"(max |difference| {diff:.3g})", flush=True)
    finally:
        ray.shutdown()
        if settings is not None:
            for folder in ("models", "checkpoints"):
                fs, path = filesystem_for(settings.uri(f"{folder}/{run}"), settings)
                fs.delete_dir_contents(path, missing_dir_ok=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
