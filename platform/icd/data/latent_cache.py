"""The latent cache: images encoded by the VAE and captions by the text encoder, once.

A Ray Data stage on an actor pool (GPU actors in production) writes parquet to
``s3://<bucket>/latents/<dataset>/<model-hash>/``; training stages read it instead of
decoding and encoding every step. ``_manifest.json`` is written last: a cache without it is
incomplete and is rebuilt, never read.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import ray
import torch

from icd.data.preprocess import to_model_range
from icd.data.reader import PreprocessOptions, counts, preprocess_shards
from icd.data.scheduling import register_idle_backoff
from icd.storage import S3Settings, filesystem_for, read_json

MANIFEST = "_manifest.json"
READ_TASKS = 2  # parquet read tasks in flight: they ask for no CPU, so nothing else bounds how many start


def model_hash(base: str, revision: str | None, options: PreprocessOptions) -> str:
    """Identity of (encoder weights, preprocessing): local weights are hashed by content."""
    from icd.models.loading import COMPONENTS, SDXL_COMPONENTS, download_s3_model
    from icd.models.toy import TOY_BASE_DIR
    from icd.storage import is_s3_uri

    digest = hashlib.sha256(json.dumps([base, revision, options.resolution, options.crop, options.seed,
                                        repr(options.sample_filter)]).encode())
    local = TOY_BASE_DIR if base == "toy" else download_s3_model(base) if is_s3_uri(base) else Path(base)
    if local.is_dir():
        for component in (*COMPONENTS[1:], *SDXL_COMPONENTS):  # the VAE and the text encoder(s) make the cache
            for f in sorted((local / component).glob("*")):
                digest.update(f.name.encode())
                digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


class LatentEncoder:
    """``map_batches`` callable: pixels -> scaled VAE latents (posterior mode), ids -> CLIP hidden states."""

    def __init__(self, base: str, revision: str | None, device: str):
        from icd.models.loading import load_bundle

        self.bundle = load_bundle(base, revision=revision, device=device)

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        pixels = to_model_range(torch.from_numpy(np.ascontiguousarray(batch["pixels"])))
        ids = torch.from_numpy(np.ascontiguousarray(batch["input_ids"])).to(self.bundle.device)
        latents = self.bundle.encode_images(pixels).float().cpu().numpy()
        sizes = batch.get("size_ids")
        sizes = None if sizes is None else torch.from_numpy(np.ascontiguousarray(sizes)).to(self.bundle.device)
        hidden = self.bundle.encode_token_ids(ids, sizes).float().cpu().numpy()  # SDXL: its packed context
        return {"key": batch["key"], "caption": batch["caption"], "input_ids": batch["input_ids"],
                "latents": latents, "encoder_hidden_states": hidden}


def cache_uri(dataset: str, digest: str, settings: S3Settings | None = None) -> str:
    settings = settings or S3Settings.from_env()
    return settings.uri(f"latents/{dataset}/{digest}")


def read_manifest(uri: str, settings: S3Settings | None = None) -> dict | None:
    """The manifest of a complete cache, or None."""
    return read_json(f"{uri.rstrip('/')}/{MANIFEST}", settings)


def build_latent_cache(dataset_uri: str, out_uri: str, base: str, options: PreprocessOptions,
                       revision: str | None = None, actors: int = 1, use_gpu: bool = False,
                       settings: S3Settings | None = None) -> dict:
    """Encode every good sample of ``dataset_uri`` into ``out_uri``; returns the manifest (with counts)."""
    existing = read_manifest(out_uri, settings)
    if existing is not None:
        return {**existing, "reused": True}
    fs, root = filesystem_for(out_uri, settings)
    fs.delete_dir_contents(root, missing_dir_ok=True)  # a partial earlier attempt
    # Half a CPU each for the two actor pools, so the read tasks always find a CPU.
    examples = preprocess_shards(dataset_uri, options, settings, cpus_per_actor=0.5)
    encoded = examples.map_batches(
        LatentEncoder, fn_constructor_args=(base, revision, "cuda" if use_gpu else "cpu"), batch_size=64,
        batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if use_gpu else 0, num_cpus=1 if use_gpu else 0.5)
    encoded.write_parquet(f"{root}", filesystem=fs)
    manifest = {"dataset": dataset_uri, "model": base, "revision": revision, "resolution": options.resolution,
                "samples": counts(options.counter_name) if options.counter_name else None}
    with fs.open_output_stream(f"{root}/{MANIFEST}") as f:
        f.write(json.dumps(manifest, indent=1).encode())
    return {**manifest, "reused": False}


def read_latent_cache(uri: str, settings: S3Settings | None = None) -> ray.data.Dataset:
    if read_manifest(uri, settings) is None:
        raise FileNotFoundError(f"{uri} is not a complete latent cache (no {MANIFEST}); build it first")
    fs, root = filesystem_for(uri, settings)
    # The read tasks ask for no CPU: they stream while the train workers hold the node's CPUs, and
    # Ray Data's budget is what the workers leave. Even 0.25 CPU each stalled training on a 2-core
    # node: none ran with two 1-CPU workers, and with two 0.75-CPU workers reading stopped after
    # 3/4 of the first epoch while the DDP workers waited for each other. The object-store budget
    # alone does not bound how many start: each file got a task and a worker process of its own
    # (100+ on a 2-core node), hence READ_TASKS. The V1 reader, because the V2 one lists files in a
    # separate 1-CPU task that such a node can never schedule.
    ray.data.DataContext.get_current().use_datasource_v2 = False
    ds = ray.data.read_parquet(root, filesystem=fs, file_extensions=["parquet"], num_cpus=0, concurrency=READ_TASKS)
    register_idle_backoff(ds.context)
    return ds


def dataset_uri(config, dataset: str | None = None, settings: S3Settings | None = None) -> str:
    """Where a dataset's shards live: ``data.shards_uri`` for the training set, else s3://<bucket>/datasets/<name>."""
    settings = settings or S3Settings.from_config(config.storage)
    if dataset is None and config.data.shards_uri:
        return config.data.shards_uri
    return settings.uri(f"datasets/{dataset or config.data.dataset}")


def cache_options(config, dataset: str) -> PreprocessOptions:
    """The preprocessing the cache applies: the config's, with the centre crop (one fixed crop per image)."""
    options = PreprocessOptions.from_config(config, counter_name=f"encode-{dataset}")
    if options.crop == "random":
        options = PreprocessOptions(options.resolution, "center", options.sample_filter, options.seed,
                                    options.counter_name)
    return options


def cache_location(config, dataset: str | None = None, settings: S3Settings | None = None) -> str:
    """The latent cache URI for a dataset under the config's model and preprocessing."""
    dataset = dataset or config.data.dataset
    options = cache_options(config, dataset)
    return cache_uri(dataset, model_hash(config.model.base, config.model.revision, options),
                     settings or S3Settings.from_config(config.storage))


def ensure_latent_cache(config, dataset: str | None = None, actors: int = 1,
                        settings: S3Settings | None = None) -> dict:
    """Build the dataset's latent cache unless a complete one exists; returns its manifest with ``cache``."""
    settings = settings or S3Settings.from_config(config.storage)
    name = dataset or config.data.dataset
    out = cache_location(config, dataset, settings)
    manifest = build_latent_cache(dataset_uri(config, dataset, settings), out, config.model.base,
                                  cache_options(config, name), config.model.revision, actors=actors,
                                  use_gpu=config.scaling.use_gpu, settings=settings)
    return {"cache": out, **manifest}
