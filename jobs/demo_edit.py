"""Edit one held-out shapes image with the registry's champion, in each editing mode, beside the original.

    python jobs/demo_edit.py --config jobs/configs/toy.yaml [--modes switch,p2p,guided] [--out .icd/demo/edit.png]

Loads models:/icd-<preset>@champion with mlflow.pyfunc (exactly as a user would), swaps the
shape's colour in the caption, edits once per mode (the request's ``mode`` column), and saves one
labelled picture: the original, then each mode's edit left to right. Prints the version used, each
mode's UNet passes and where the picture went.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
from pathlib import Path

import mlflow
import pandas as pd
from PIL import Image, ImageDraw

from icd.config import load_config
from icd.editing.modes import MODES
from icd.evaluation.editing import color_edits
from icd.evaluation.reconstruction import load_eval_images
from icd.storage import S3Settings
from icd.train.tracking import tracking_uri


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--index", type=int, default=0, help="which held-out image")
    parser.add_argument("--modes", type=mode_list, default=list(MODES), help=f"comma-separated, of {MODES}")
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
    request = pd.DataFrame({"image": [buffer.getvalue()] * len(args.modes),
                            "source_prompt": [edit.source_prompt] * len(args.modes),
                            "target_prompt": [edit.target_prompt] * len(args.modes), "mode": args.modes})
    out = model.predict(request)
    edits = [Image.open(io.BytesIO(base64.b64decode(image))).convert("RGB") for image in out["image"]]
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    labelled_row([source, *edits], ["original", *args.modes]).save(path)
    print(json.dumps({"model": name, "version": version.version, "source_prompt": edit.source_prompt,
                      "target_prompt": edit.target_prompt,
                      "modes": {mode: {"nfe": int(nfe)} for mode, nfe in zip(out["mode"], out["nfe"])},
                      "image": str(path.resolve())}))


def mode_list(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if not modes or unknown:
        raise argparse.ArgumentTypeError(f"--modes: expected a comma-separated list of {MODES}, got {text!r}")
    return modes


def labelled_row(panels: list[Image.Image], labels: list[str], scale: int = 8, strip: int = 14) -> Image.Image:
    """The panels side by side, each enlarged ``scale`` times (nearest neighbour), its label in a strip below."""
    width, height = panels[0].width * scale, panels[0].height * scale
    row = Image.new("RGB", (width * len(panels), height + strip), "white")
    draw = ImageDraw.Draw(row)
    for i, (panel, label) in enumerate(zip(panels, labels)):
        row.paste(panel.resize((width, height), Image.NEAREST), (i * width, 0))
        draw.text((i * width + 4, height + 1), label, fill="black")
    return row


if __name__ == "__main__":
    main()
