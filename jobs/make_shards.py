"""Write a LAION-format dataset (img2dataset layout) to object storage.

    python jobs/make_shards.py --name shapes --count 20000 --per-shard 1000 --eval-count 512 --val-count 256
    python jobs/make_shards.py --name my-photos --from-dir ./photos [--captions captions.csv]

Shapes-world images go to s3://<bucket>/datasets/<name>/, the held-out split (seeds that
never overlap the training ones) to s3://<bucket>/datasets/<name>-eval/, and the validation
split that chooses which checkpoint a stage exports (`train.<stage>.export: best_validation`;
seeds that overlap neither) to s3://<bucket>/datasets/<name>-val/.
"""

from __future__ import annotations

import argparse
import json

from tqdm import tqdm

from icd.data.shapes import EVAL_SEED_OFFSET, VALIDATION_SEED_OFFSET
from icd.data.shards import write_dataset
from icd.data.sources import folder_samples, shapes_samples
from icd.storage import S3Settings, read_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="dataset name: s3://<bucket>/datasets/<name>/")
    parser.add_argument("--count", type=int, default=20_000, help="shapes images in the training split")
    parser.add_argument("--eval-count", type=int, default=512, help="shapes images in <name>-eval (0: none)")
    parser.add_argument("--val-count", type=int, default=256, help="shapes images in <name>-val (0: none)")
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0, help="first shapes seed")
    parser.add_argument("--from-dir", help="pack a folder of images with captions instead of shapes")
    parser.add_argument("--captions", help="with --from-dir: CSV with columns file, caption")
    parser.add_argument("--bucket", help="default: $ICD_BUCKET")
    parser.add_argument("--root", help="write under this URI or local dir instead of s3://<bucket>/datasets/")
    parser.add_argument("--skip-existing", action="store_true", help="keep a split that is already complete")
    args = parser.parse_args()

    settings = S3Settings.from_env(bucket=args.bucket)
    root = (args.root.rstrip("/") if args.root else settings.uri("datasets"))
    if args.from_dir:
        splits = [(args.name, folder_samples(args.from_dir, args.captions), None)]
    else:
        splits = [(args.name, shapes_samples(args.count, args.seed), args.count)]
        if args.eval_count:
            splits.append((f"{args.name}-eval", shapes_samples(args.eval_count, EVAL_SEED_OFFSET + args.seed),
                           args.eval_count))
        if args.val_count:
            splits.append((f"{args.name}-val", shapes_samples(args.val_count, VALIDATION_SEED_OFFSET + args.seed),
                           args.val_count))
    for name, samples, total in splits:
        uri = f"{root}/{name}"
        if args.skip_existing and (stats := read_json(f"{uri}/_stats.json", settings)) is not None:
            print(json.dumps({"dataset": uri, **stats, "skipped": True}))
            continue
        with tqdm(total=total, desc=name, unit="img") as bar:
            stats = write_dataset(samples, uri, args.per_shard, settings, progress=bar)
        print(json.dumps({"dataset": uri, **stats}))


if __name__ == "__main__":
    main()
