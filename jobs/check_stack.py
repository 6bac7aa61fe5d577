"""Check, from inside the Ray cluster, that a job can use everything the stack offers.

    ray job submit --working-dir . -- python jobs/check_stack.py

Ray Data writes a small parquet table to S3 and reads it back through the shared pyarrow
S3 filesystem; MLflow logs a run whose artifact lands in the bucket. The last line printed
is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid

import mlflow
import ray

from icd.storage import S3Settings, check_access, s3_client, s3_filesystem, split_s3_uri


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="stack-check")
    args = parser.parse_args()

    ray.init()
    settings = S3Settings.from_env()
    check_access(settings)

    check_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    table_uri = settings.uri(f"checks/{check_id}/table")
    fs = s3_filesystem(settings)
    rows = [{"i": i, "square": i * i} for i in range(100)]
    ray.data.from_items(rows).write_parquet(table_uri, filesystem=fs)
    read_back = ray.data.read_parquet(table_uri, filesystem=fs).sum("square")
    if read_back != sum(r["square"] for r in rows):
        raise SystemExit(f"S3 round trip through Ray Data returned {read_back}, expected {sum(r['square'] for r in rows)}")

    mlflow.set_experiment(args.experiment)
    with mlflow.start_run(run_name=check_id) as run:
        mlflow.log_metric("sum_of_squares", read_back)
        mlflow.log_dict({"check_id": check_id, "table": table_uri}, "check.json")
    # The server proxies artifacts to s3://<bucket>/mlflow/<experiment>/<run>/artifacts/.
    bucket, _ = split_s3_uri(settings.uri())
    listed = s3_client(settings).list_objects_v2(Bucket=bucket, Prefix="mlflow/")
    artifact_keys = [o["Key"] for o in listed.get("Contents", []) if run.info.run_id in o["Key"]]
    if not artifact_keys:
        raise SystemExit(f"MLflow artifact of run {run.info.run_id} not found under s3://{bucket}/mlflow/")

    print(json.dumps({"ok": True, "table": table_uri, "sum_of_squares": read_back,
                      "mlflow_run": run.info.run_id, "artifacts": artifact_keys}))


if __name__ == "__main__":
    main()
