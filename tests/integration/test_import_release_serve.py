"""An imported release, registered in the stack's MLflow, served by the Serve app as any trained version."""

from __future__ import annotations

import base64
import hashlib
import io
import os

import mlflow
import pytest
import requests
from PIL import Image

from icd.config import load_config
from icd.registry.release_import import prepare_release, register_release

NAME = "icd-release-serve"
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def png_b64(size=(40, 24), color=(220, 40, 40)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def registered(stack, released_checkpoints, tmp_path_factory):
    """Versions 1 (4 steps, [259, 519, 779, 999]) and 2 (3 steps) of one registered model; 3: an iCD-XL release
    (SDXL-shaped files on an SDXL-architecture base)."""
    saved = dict(os.environ)
    os.environ.update({k: v for k, v in stack.client_env().items() if not k.startswith("RAY_")})
    files = released_checkpoints
    config = load_config("jobs/configs/toy.yaml")
    versions = {}
    # the 4-step set from local paths, the 3-step set from object storage (s3:// URIs)
    from icd.storage import s3_client

    client, bucket = s3_client(), stack.bucket
    sources = {"4steps_1": [str(files.teacher), str(files.reverse()), str(files.forward())], "3steps": []}
    for path in (files.teacher, files.reverse("3steps"), files.forward("3steps")):
        client.upload_file(str(path), bucket, f"releases/{path.name}")
        sources["3steps"].append(f"s3://{bucket}/releases/{path.name}")
    for steps, (teacher, reverse, forward) in sources.items():
        release = prepare_release(teacher, reverse, forward, str(files.base), tmp_path_factory.mktemp(steps),
                                  cache_dir=tmp_path_factory.mktemp("cache"))
        versions[steps] = register_release(release, config, NAME)["version"]
    from release_checkpoints import build_released_xl_checkpoints

    xl = build_released_xl_checkpoints(tmp_path_factory.mktemp("xl"))
    release = prepare_release(str(xl.teacher), str(xl.reverse), str(xl.forward), str(xl.base),
                              tmp_path_factory.mktemp("xl-out"), cache_dir=tmp_path_factory.mktemp("cache"))
    versions["xl"] = register_release(release, config, NAME)["version"]
    tags = mlflow.MlflowClient().get_model_version(NAME, str(versions["3steps"])).tags
    assert tags["icd.source.reverse"] == sources["3steps"][1]
    assert tags["icd.source.reverse.sha256"] == hashlib.sha256(files.reverse("3steps").read_bytes()).hexdigest()
    yield versions
    os.environ.clear()
    os.environ.update(saved)


def test_an_imported_release_is_served_like_a_trained_model(registered, stack, local_ray):
    from ray import serve

    from serve.app import build_app

    port = stack.serve_port + 110
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    body = {"image": png_b64(), "source_prompt": "a red circle on a blue background",
            "target_prompt": "a green circle on a blue background"}
    try:
        for steps, nfe in (("4steps_1", 8), ("3steps", 6), ("xl", 8)):  # 4 + 4 and 3 + 3 UNet passes
            serve.run(build_app({"model_uri": f"models:/{NAME}/{registered[steps]}"}), name="icd-release",
                      route_prefix="/")
            info = requests.get(f"{url}/v1/models", timeout=60).json()
            assert info["loaded"] and info["steps"] == nfe // 2, info
            response = requests.post(f"{url}/v1/edit", json=body, timeout=300)
            assert response.status_code == 200, response.text
            out = response.json()
            assert out["nfe"] == nfe and out["model_version"] == str(registered[steps])
            assert Image.open(io.BytesIO(base64.b64decode(out["image"]))).size == (40, 24)
    finally:
        serve.shutdown()
