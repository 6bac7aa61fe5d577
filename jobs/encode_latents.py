"""Encode a dataset's images and captions once into the latent cache (a Ray Data job).

    ray job submit --working-dir . -- python jobs/encode_latents.py --config jobs/configs/toy.yaml

Reads s3://<bucket>/datasets/<data.dataset>/ (or data.shards_uri), writes
s3://<bucket>/latents/<dataset>/<model-hash>/ and prints its manifest (sample counts by
outcome) as the last line. A complete cache is reused, not rebuilt.
"""

from __future__ import annotations

import argparse
import json

import ray

from icd.config import load_config
from icd.data.latent_cache import build_latent_cache, cache_uri, model_hash
from icd.data.reader import PreprocessOptions
from icd.storage import S3Settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--dataset", help="encode this dataset name instead of data.dataset (e.g. the eval split)")
    parser.add_argument("--actors", type=int, default=1, help="encoder actors (one GPU each when scaling.use_gpu)")
    args = parser.parse_args()

    config = load_config(args.config, args.set)
    settings = S3Settings.from_config(config.storage)
    dataset = args.dataset or config.data.dataset
    source = config.data.shards_uri if (config.data.shards_uri and not args.dataset) else settings.uri(f"datasets/{dataset}")
    ray.init()
    options = PreprocessOptions.from_config(config, counter_name=f"encode-{dataset}")
    if options.crop == "random":  # the cache holds one fixed crop per image
        options = PreprocessOptions(options.resolution, "center", options.sample_filter, options.seed, options.counter_name)
    out = cache_uri(dataset, model_hash(config.model.base, config.model.revision, options), settings)
    manifest = build_latent_cache(source, out, config.model.base, options, config.model.revision,
                                  actors=args.actors, use_gpu=config.scaling.use_gpu, settings=settings)
    print(json.dumps({"cache": out, **manifest}))


if __name__ == "__main__":
    main()
