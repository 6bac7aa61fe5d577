"""Edit one held-out shapes image with the registry's champion and save it beside the original.

    python jobs/demo_edit.py --config jobs/configs/toy.yaml [--out .icd/demo/edit.png]

Loads models:/icd-<preset>@champion with mlflow.pyfunc (exactly as a user would), swaps the
shape's colour in the caption, and prints the version used and where the picture went.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
from pathlib import Path

import mlflow
import pandas as pd
from PIL import Image

from icd.config import load_config
from icd.evaluation.editing import color_edits
from icd.evaluation.reconstruction import load_eval_images
from icd.storage import S3Settings
from icd.train.tracking import tracking_uri


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--index", type=int, default=0, help="which held-out image")
    parser.add_argument("--out", default=".icd/demo/edit.png")
    args = parser.parse_args()

    config = load_config(args.config, args.set)
    settings = S3Settings.from_config(config.storage)
    name = config.tracking.model_name(config.preset)
    mlflow.set_tracking_uri(tracking_uri(config))
    version = mlflow.MlflowClient().get_model_version_by_alias(name, "champion")
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")

    images, captions = load_eval_images(settings.uri(f"datasets/{config.data.eval_dataset}"), args.index + 1,
                                        config.model.resolution, settings)
    edit = color_edits(captions)[args.index]
    source = Image.fromarray(((images[args.index].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype("uint8"))
    buffer = io.BytesIO()
    source.save(buffer, format="PNG")
    out = model.predict(pd.DataFrame({"image": [buffer.getvalue()], "source_prompt": [edit.source_prompt],
                                      "target_prompt": [edit.target_prompt]}))
    edited = Image.open(io.BytesIO(base64.b64decode(out["image"][0])))
    side_by_side = Image.new("RGB", (source.width * 2, source.height))
    side_by_side.paste(source, (0, 0))
    side_by_side.paste(edited.convert("RGB"), (source.width, 0))
    side_by_side = side_by_side.resize((side_by_side.width * 8, side_by_side.height * 8), Image.NEAREST)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    side_by_side.save(path)
    print(json.dumps({"model": name, "version": version.version, "source_prompt": edit.source_prompt,
                      "target_prompt": edit.target_prompt, "nfe": int(out["nfe"][0]), "image": str(path.resolve())}))


if __name__ == "__main__":
    main()
