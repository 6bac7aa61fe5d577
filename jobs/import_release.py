"""Register the published iCD (or Inverse-and-Edit) checkpoints as a version of a registered model.

    python jobs/import_release.py \\
        --teacher s3://models/icd/sd15_cfg_distill.pt \\
        --reverse s3://models/icd/iCD-SD15-reverse_259_519_779_999.safetensors \\
        --forward s3://models/icd/iCD-SD15-forward_19_259_519_779.safetensors \\
        --name icd-sd15-release --alias champion

Inverse-and-Edit's cycle-tuned encoder starts at t = 0 and goes with the reverse file of the first set:

    python jobs/import_release.py --teacher ... --reverse .../iCD-SD15-reverse_259_519_779_999.safetensors \\
        --forward ilushado/Cycle-consistency/finetuned_forward_model.safetensors --start-timestep 0 --name ...

Inputs are local paths, s3:// URIs or hub file ids; the VAE, text encoder and tokenizer come from
``--base`` (default: the config's model.base). The boundaries come from the adapter file names
or from --reverse-timesteps / --forward-timesteps, and must mirror each other. Then
``icd serve up --model-uri models:/<name>/<version>`` serves it. The last line printed is JSON:
``{"name", "version", "boundaries", "start_timestep"}``. Nothing is registered when a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from icd.config import load_config
from icd.models.loading import ModelLoadError
from icd.registry.release_import import prepare_release, register_release
from icd.registry.releases import OFFICIAL_LORA_ALPHA, ReleaseError, parse_timesteps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="guidance-distilled UNet: tensor-only .pt, safetensors "
                        "or diffusers directory")
    parser.add_argument("--reverse", required=True, help="the reverse (decoder) LoRA safetensors")
    parser.add_argument("--forward", required=True, help="the forward (encoder) LoRA safetensors")
    parser.add_argument("--base", help="VAE / text encoder / tokenizer source (default: the config's model.base)")
    parser.add_argument("--start-timestep", type=int, choices=(19, 0),
                        help="the encoder's first timestep (19 as iCD released; 0 for Inverse-and-Edit)")
    parser.add_argument("--reverse-timesteps", help="e.g. 259,519,779,999 when the file name does not say")
    parser.add_argument("--forward-timesteps", help="e.g. 19,259,519,779 when the file name does not say")
    parser.add_argument("--lora-alpha", type=float, default=OFFICIAL_LORA_ALPHA,
                        help="not stored in the files; PEFT's default 8 for the released ones")
    parser.add_argument("--name", required=True, help="registered model name")
    parser.add_argument("--alias", help="also point this alias at the new version")
    parser.add_argument("--config", default="jobs/configs/sd15.yaml", help="editing and serving settings")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    config = load_config(args.config, args.set)
    try:
        with tempfile.TemporaryDirectory(prefix="icd-release-") as tmp:
            release = prepare_release(
                args.teacher, args.reverse, args.forward, args.base or config.model.base, Path(tmp),
                revision=None if args.base else config.model.revision, start_timestep=args.start_timestep,
                reverse_timesteps=args.reverse_timesteps and parse_timesteps(args.reverse_timesteps,
                                                                             "--reverse-timesteps"),
                forward_timesteps=args.forward_timesteps and parse_timesteps(args.forward_timesteps,
                                                                             "--forward-timesteps"),
                lora_alpha=args.lora_alpha)
            print(f"checked: teacher, reverse and forward adapters (rank {release.rank}, alpha {args.lora_alpha:g}); "
                  f"boundaries {release.manifest['boundaries']}")
            result = register_release(release, config, args.name, args.alias)
    except (ReleaseError, ModelLoadError) as exc:
        print(f"import_release: {exc}. Nothing was registered.", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
