"""The Serve application under serve.run on the toy preset, over HTTP."""

from __future__ import annotations

import base64
import io
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from PIL import Image

from icd.config import load_config
from icd.train.stages import export_untrained

SOURCE, TARGET = "a red circle on a blue background", "a green circle on a blue background"


def png_b64(size=(40, 24), color=(220, 40, 40)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def size_of(b64: str) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(b64))).size


@pytest.fixture(scope="module")
def served(stack, local_ray, tmp_path_factory):
    from ray import serve

    saved = dict(os.environ)
    # S3 and MLflow of the stack; Serve runs on the session's local Ray (so not the head's RAY_*).
    os.environ.update({k: v for k, v in stack.client_env().items() if not k.startswith("RAY_")})
    config = load_config("jobs/configs/toy.yaml")
    manifest = export_untrained(config, "serve-test", str(tmp_path_factory.mktemp("serve-model")))
    port = stack.serve_port + 100
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    from serve.app import build_app

    serve.run(build_app({"model_uri": f"{manifest['output']}/manifest.json"}), name="icd", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    os.environ.clear()
    os.environ.update(saved)


def test_health_and_models(served):
    assert requests.get(f"{served}/healthz", timeout=30).json()["status"] == "ok"
    info = requests.get(f"{served}/v1/models", timeout=30).json()
    assert info["loaded"] and info["steps"] == 4 and info["resolution"] == 32
    # the served form: each direction's LoRA fused into its own UNet, so two UNets' weights
    weights = info["weights_bytes"]
    assert info["fused"] and weights["total"] == weights["unet"] + weights["vae"] + weights["text_encoder"]
    assert weights["unet"] > weights["vae"] > 0


def test_edit_round_trip_keeps_the_size_and_reports_8_nfe(served):
    body = {"image": png_b64((40, 24)), "source_prompt": SOURCE, "target_prompt": TARGET}
    response = requests.post(f"{served}/v1/edit", json=body, timeout=120)
    assert response.status_code == 200, response.text
    out = response.json()
    assert out["nfe"] == 8 and size_of(out["image"]) == (40, 24) and out["model_version"]


def test_one_inversion_serves_many_edits(served):
    inverted = requests.post(f"{served}/v1/invert", json={"image": png_b64((33, 33)), "prompt": SOURCE},
                             timeout=120).json()
    assert inverted["nfe"] == 4 and len(inverted["latent_id"]) == 64
    for target in (TARGET, "a yellow circle on a blue background"):
        out = requests.post(f"{served}/v1/edit", json={"latent_id": inverted["latent_id"], "target_prompt": target},
                            timeout=120).json()
        assert out["nfe"] == 4 and size_of(out["image"]) == (33, 33)


def test_reconstruct_and_generate(served):
    recon = requests.post(f"{served}/v1/reconstruct", json={"image": png_b64((20, 30)), "prompt": SOURCE},
                          timeout=120).json()
    assert recon["nfe"] == 8 and size_of(recon["image"]) == (20, 30)
    gen = requests.post(f"{served}/v1/generate", json={"prompt": SOURCE, "width": 64, "height": 48}, timeout=120).json()
    assert gen["nfe"] == 4 and size_of(gen["image"]) == (64, 48)


def test_concurrent_requests_share_batches(served):
    before = requests.get(f"{served}/v1/models", timeout=30).json()["calls"]
    bodies = [{"image": png_b64((32, 32), (20 * i, 40, 40)), "source_prompt": SOURCE, "target_prompt": TARGET,
               "guidance": float(i)} for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda b: requests.post(f"{served}/v1/edit", json=b, timeout=300), bodies))
    assert all(r.status_code == 200 for r in results)
    calls = requests.get(f"{served}/v1/models", timeout=30).json()["calls"] - before
    assert calls < len(bodies), calls  # unbatched: one model call per request


@pytest.mark.parametrize("body,status,field", [
    ({"image": "not base64!", "source_prompt": SOURCE, "target_prompt": TARGET}, 400, "image"),
    ({"image": base64.b64encode(b"plain text").decode(), "source_prompt": SOURCE, "target_prompt": TARGET}, 400, "image"),
    ({"image": png_b64(), "source_prompt": SOURCE, "target_prompt": "  "}, 422, "target_prompt"),
    ({"image": png_b64(), "source_prompt": SOURCE, "target_prompt": "x" * 501}, 422, "target_prompt"),
    ({"image": png_b64(), "source_prompt": "", "target_prompt": TARGET}, 422, "source_prompt"),
    ({"image": png_b64(), "source_prompt": SOURCE, "target_prompt": TARGET, "guidance": "high"}, 422, "guidance"),
    ({"latent_id": "0" * 64, "target_prompt": TARGET}, 404, "latent_id"),
    ({"latent_id": "abc", "target_prompt": TARGET}, 422, "latent_id"),
    ({"source_prompt": SOURCE, "target_prompt": TARGET}, 422, "image"),
    ({"image": png_b64(), "source_prompt": SOURCE, "target_prompt": TARGET, "steps": 3}, 422, "steps"),
    ({"image": png_b64(), "source_prompt": SOURCE, "target_prompt": TARGET, "mode": "magic"}, 422, "mode"),
])
def test_bad_requests_get_a_4xx_naming_the_field(served, body, status, field):
    response = requests.post(f"{served}/v1/edit", json=body, timeout=60)
    assert response.status_code == status, response.text
    assert response.json()["field"] == field


def test_the_config_file_is_a_valid_serve_deploy_config():
    import yaml
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(yaml.safe_load(open("serve/config.yaml")))
    app = schema.applications[0]
    assert app.import_path == "serve.app:app" and {d.name for d in app.deployments} == {"Gateway", "Editor"}
    editor = next(d for d in app.deployments if d.name == "Editor")
    assert editor.max_ongoing_requests >= 8  # at least max_batch_size


def test_api_key_and_overload(served):
    from ray import serve

    from serve.app import build_app

    key_env = {"runtime_env": {"env_vars": {"ICD_SERVE_API_KEY": "sesame"}}}
    serve.run(build_app({"model_uri": _manifest(served), "gateway_options": {
        "ray_actor_options": key_env, "max_ongoing_requests": 1, "max_queued_requests": 1}}),
        name="icd", route_prefix="/")
    body = {"image": png_b64(), "source_prompt": SOURCE, "target_prompt": TARGET}
    denied = requests.post(f"{served}/v1/edit", json=body, timeout=60)
    assert denied.status_code == 401 and denied.json()["field"] == "x-api-key"
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: requests.post(f"{served}/v1/edit", json=body, timeout=300,
                                                        headers={"X-API-Key": "sesame"}), range(8)))
    codes = sorted(r.status_code for r in results)
    assert 200 in codes and 503 in codes, codes  # a bounded queue: the rest are turned away
    assert all(r.headers.get("Retry-After") == "1" for r in results if r.status_code == 503)


def test_max_batch_size_is_a_user_config_knob(served):
    from ray import serve

    from serve.app import build_app

    uri = _manifest(served)
    serve.run(build_app({"model_uri": uri, "editor_options": {"user_config": {"model_uri": uri, "max_batch_size": 1}}}),
              name="icd", route_prefix="/")
    info = requests.get(f"{served}/v1/models", timeout=30).json()
    assert info["max_batch_size"] == 1
    bodies = [{"image": png_b64((32, 32), (30 * i, 40, 40)), "source_prompt": SOURCE, "target_prompt": TARGET}
              for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda b: requests.post(f"{served}/v1/edit", json=b, timeout=300), bodies))
    assert all(r.status_code == 200 for r in results)
    assert requests.get(f"{served}/v1/models", timeout=30).json()["calls"] - info["calls"] == len(bodies)


def _manifest(served) -> str:
    return requests.get(f"{served}/v1/models", timeout=30).json()["source"]
