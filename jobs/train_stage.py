"""Train one stage (cfg_distill, icd or cycle) as a Ray Train job on the cluster it is submitted to.

    ray job submit --working-dir . -- python jobs/train_stage.py --stage icd --config jobs/configs/toy.yaml

Reads the previous stage's output of the same run, writes
s3://<bucket>/models/<run>/<stage>-<identity>/ (artifacts + manifest.json) and prints the
manifest as the last line. A finished stage is not trained again; an interrupted one
resumes from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import uuid
from pathlib import Path

import ray

from icd.config import load_config
from icd.train.progress import quiet_data_progress
from icd.train.runner import run_stage
from icd.train.stages import STAGES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", required=True, choices=STAGES)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--run", help="run name grouping the stages' outputs (default: <preset>-<hash>)")
    parser.add_argument("--max-failures", type=int, default=3, help="worker-group restarts before giving up")
    parser.add_argument("--failure-drill", metavar="RANK:STEP",
                        help="kill worker RANK once after STEP steps, to rehearse recovery from a checkpoint")
    args = parser.parse_args()

    config = load_config(args.config, args.set)
    drill = None
    if args.failure_drill:
        rank, step = (int(v) for v in args.failure_drill.split(":"))
        # One marker per submission: the restarted worker must not die again, and a marker left by an
        # earlier submission (same config, same machine) must not disarm this one.
        marker = Path(tempfile.gettempdir()) / f"icd-failure-drill-{args.stage}-{rank}-{step}-{uuid.uuid4().hex}"
        drill = {"rank": rank, "step": step, "marker": str(marker)}
    ray.init()
    quiet_data_progress()  # the log shows the training's progress lines, not Ray Data's per-block bars
    try:
        manifest = run_stage(config, args.stage, run=args.run, max_failures=args.max_failures, failure_drill=drill)
    finally:
        if drill:
            Path(drill["marker"]).unlink(missing_ok=True)
    print(json.dumps(manifest))


if __name__ == "__main__":
    main()
