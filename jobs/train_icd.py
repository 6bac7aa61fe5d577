"""The whole training DAG on the Ray cluster it is submitted to.

    ray job submit --working-dir . -- python jobs/train_icd.py --config jobs/configs/toy.yaml

shards present? -> encode latents -> cfg_distill -> icd -> (evaluate icd || cycle) ->
evaluate cycle -> register -> promote. Finished steps are reused, so submitting it again
after a crash resumes where it stopped. The last line is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys

from icd.config import load_config
from icd.train.progress import quiet_data_progress
from icd.pipeline.dag import STEPS, TrainingDAG, select_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--run", help="run name (default: <preset>-<hash>); outputs live under it")
    parser.add_argument("--stages", help=f"comma-separated subset of: {','.join(STEPS)}")
    parser.add_argument("--from-stage", choices=STEPS, help="start here; earlier outputs must exist")
    parser.add_argument("--eval-count", type=int, default=128, help="held-out images per evaluation")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and what would be reused")
    args = parser.parse_args()

    config = load_config(args.config, args.set)
    dag = TrainingDAG(config, run=args.run, eval_count=args.eval_count)
    steps = select_steps(args.stages.split(",") if args.stages else None, args.from_stage)
    if args.dry_run:
        for item in dag.plan():
            action = item.action if item.step in steps else "not selected"
            print(f"{item.step:15s} {action:12s} {item.detail}")
        return
    import ray

    from icd.evaluation.regression import StageRegression
    from icd.pipeline.dag import PipelineError

    ray.init()
    quiet_data_progress()  # the log shows the training's progress lines, not Ray Data's per-block bars
    try:
        summary = dag.execute(steps)
    except (PipelineError, StageRegression) as error:  # a message for people, not a traceback
        sys.exit(f"train_icd: {error}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
