"""Move alias `champion` to a registered version if it passes the config's gates, else `challenger`.

    python jobs/promote.py --config jobs/configs/toy.yaml --version 3

Prints the decision and its reasons; exits 1 when the candidate is refused (so CI can gate on it).
"""

from __future__ import annotations

import argparse
import json
import sys

import mlflow

from icd.config import load_config
from icd.registry.promotion import promote
from icd.train.tracking import tracking_uri


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--version", required=True, help="the registered model version to promote")
    args = parser.parse_args()

    config = load_config(args.config, args.set)
    name = config.tracking.model_name(config.preset)
    client = mlflow.MlflowClient(tracking_uri(config))
    decision = promote(client, name, args.version, config.tracking.gates)
    print(json.dumps({"model": name, "version": args.version, "promoted": decision.promote,
                      "reasons": decision.reasons}))
    sys.exit(0 if decision.promote else 1)


if __name__ == "__main__":
    main()
