"""A registered model without this package: the README's plain-diffusers recipe, run as written,
edits exactly as our pipeline does (fp32)."""

import re
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from icd.config import load_config
from icd.editing.modes import edit
from icd.editing.pipeline import to_model_input
from icd.registry.release_import import prepare_release, register_release

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
SOURCE, TARGET = "a red circle on a blue background", "a green circle on a blue background"


def readme_recipe() -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(r"<!-- example: diffusers -->\n```python\n(.*?)```", text, re.S)
    assert match, "README.md lost its <!-- example: diffusers --> block"
    return match.group(1)


def with_inputs(code: str, replacements: dict[str, str]) -> str:
    for line, new in replacements.items():
        assert line in code, f"the README recipe no longer has the line {line!r}"
        code = code.replace(line, new)
    return code


def test_the_readme_recipe_edits_like_our_pipeline(released_checkpoints, tmp_path, monkeypatch):
    files = released_checkpoints
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.MlflowClient(uri).create_experiment("icd-imports", artifact_location=str(tmp_path / "artifacts"))
    config = load_config("jobs/configs/toy.yaml", [f"tracking.tracking_uri={uri}"])
    release = prepare_release(str(files.teacher), str(files.reverse()), str(files.forward()), str(files.base),
                              tmp_path / "release")
    register_release(release, config, "icd-interop")
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8))  # any size: resized both ways
    code = with_inputs(readme_recipe(), {
        'model_uri = "models:/icd-sd15@champion"': 'model_uri = "models:/icd-interop/1"',
        'image = Image.open("photo.jpg")': "image = PHOTO",
        'source, target = "a cat sitting on a bench", "a dog sitting on a bench"': f"source, target = {SOURCE!r}, {TARGET!r}",
        "guidance, tau, seed, resolution = 7.0, 0.8, 0, 512": "guidance, tau, seed, resolution = 7.0, 0.8, 3, 32",
    })
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    try:
        namespace = {"PHOTO": photo}
        exec(compile(code, "README.md:diffusers", "exec"), namespace)
        ours = mlflow.pyfunc.load_model("models:/icd-interop/1").unwrap_python_model().pipeline
    finally:
        mlflow.set_tracking_uri(None)
    with torch.inference_mode():
        latents = edit(ours.bundle, [SOURCE], [TARGET], ours.boundaries, images=to_model_input([photo], 32),
                       guidance=7.0, tau=0.8, generator=torch.Generator().manual_seed(3), decode=False).latents
    assert torch.allclose(namespace["x"], latents, atol=1e-4), (namespace["x"] - latents).abs().max()
    picture = np.asarray(Image.open(tmp_path / "edited.png"), dtype=np.int16)
    expected = np.asarray(ours.edit([photo], [SOURCE], [TARGET], guidance=7.0, tau=0.8, seed=3).images[0],
                          dtype=np.int16)
    assert picture.shape == (24, 40, 3) and np.abs(picture - expected).max() <= 1
    # guidance reaches the UNet (the check would not see a recipe that ignored w)
    with torch.inference_mode():
        unguided = edit(ours.bundle, [SOURCE], [TARGET], ours.boundaries, images=to_model_input([photo], 32),
                        guidance=0.0, tau=0.8, generator=torch.Generator().manual_seed(3), decode=False).latents
    assert (unguided - latents).abs().max() > 1e-2
