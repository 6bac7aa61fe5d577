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
from icd.data.latent_cache import ensure_latent_cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--dataset", help="encode this dataset name instead of data.dataset (e.g. the eval split)")
    parser.add_argument("--actors", type=int, default=1, help="encoder actors (one GPU each when scaling.use_gpu)")
    args = parser.parse_args()

    config = load_config(args.config, args.set)
    ray.init()
    print(json.dumps(ensure_latent_cache(config, args.dataset, actors=args.actors)))


if __name__ == "__main__":
    main()
