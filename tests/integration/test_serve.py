"""The Serve application under serve.run on the toy preset, over HTTP."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from PIL import Image

from icd.config import load_config
from icd.train.stages import export_untrained

SOURCE, TARGET = "a red circle on a blue background", "a green circle on a blue background"
REPO = Path(__file__).resolve().parents[2]
MAX_BODY = 1024 * 1024  # the served app's max_body_bytes here


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

    serve.run(build_app({"model_uri": f"{manifest['output']}/manifest.json", "max_body_bytes": MAX_BODY}),
              name="icd", route_prefix="/")
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


def png_bytes(size=(40, 24), color=(220, 40, 40)) -> bytes:
    return base64.b64decode(png_b64(size, color))


def send(url: str, path: str, fields: dict, image: bytes | None, form: str, **kwargs) -> requests.Response:
    """One request in either form: JSON with the image as base64, or multipart with an image file part."""
    if form == "json":
        body = {**fields, **({"image": base64.b64encode(image).decode()} if image is not None else {})}
        return requests.post(f"{url}{path}", json=body, timeout=120, **kwargs)
    files = {"image": ("photo.png", image, "image/png")} if image is not None else None
    return requests.post(f"{url}{path}", data={k: str(v) for k, v in fields.items()}, files=files, timeout=120,
                         **kwargs)


# Every bad input is a 4xx naming the field, never a 5xx, whichever form the request took.
BAD_EDITS = [  # (fields, image, status, field)
    ({"source_prompt": SOURCE, "target_prompt": TARGET}, b"plain text", 400, "image"),
    ({"source_prompt": SOURCE, "target_prompt": "  "}, png_bytes(), 422, "target_prompt"),
    ({"source_prompt": SOURCE, "target_prompt": "x" * 501}, png_bytes(), 422, "target_prompt"),
    ({"source_prompt": "", "target_prompt": TARGET}, png_bytes(), 422, "source_prompt"),
    ({"source_prompt": SOURCE, "target_prompt": TARGET, "guidance": "high"}, png_bytes(), 422, "guidance"),
    ({"latent_id": "0" * 64, "target_prompt": TARGET}, None, 404, "latent_id"),
    ({"latent_id": "abc", "target_prompt": TARGET}, None, 422, "latent_id"),
    ({"source_prompt": SOURCE, "target_prompt": TARGET}, None, 422, "image"),
    ({"source_prompt": SOURCE, "target_prompt": TARGET, "steps": 3}, png_bytes(), 422, "steps"),
    ({"source_prompt": SOURCE, "target_prompt": TARGET, "mode": "magic"}, png_bytes(), 422, "mode"),
    ({"source_prompt": SOURCE, "target_prompt": TARGET, "response_format": "gif"}, png_bytes(), 422,
     "response_format"),
    ({"source_prompt": SOURCE}, png_bytes(), 422, "target_prompt"),
    ({"source_prompt": SOURCE, "target_prompt": TARGET}, b"x" * (2 * MAX_BODY), 413, "body"),
]


@pytest.mark.parametrize("form", ["json", "multipart"])
@pytest.mark.parametrize("fields,image,status,field", BAD_EDITS)
def test_bad_requests_get_a_4xx_naming_the_field(served, form, fields, image, status, field):
    response = send(served, "/v1/edit", fields, image, form)
    assert response.status_code == status, response.text
    assert response.json()["field"] == field


@pytest.mark.parametrize("path,fields,status,field", [
    ("/v1/invert", {}, 422, "prompt"),
    ("/v1/reconstruct", {"prompt": " "}, 422, "prompt"),
    ("/v1/invert", {"prompt": SOURCE, "seed": -1}, 422, "seed"),
])
@pytest.mark.parametrize("form", ["json", "multipart"])
def test_bad_inversions_get_a_4xx_in_both_forms(served, form, path, fields, status, field):
    response = send(served, path, fields, png_bytes(), form)
    assert response.status_code == status and response.json()["field"] == field, response.text


def test_json_only_and_form_only_mistakes(served):
    not_b64 = requests.post(f"{served}/v1/edit", json={"image": "not base64!", "source_prompt": SOURCE,
                                                       "target_prompt": TARGET}, timeout=60)
    assert not_b64.status_code == 400 and not_b64.json()["field"] == "image"
    wrong_part = requests.post(f"{served}/v1/edit", data={"source_prompt": SOURCE, "target_prompt": TARGET},
                               files={"photo": ("a.png", png_bytes(), "image/png")}, timeout=60)
    assert wrong_part.status_code == 422 and wrong_part.json()["field"] == "photo"
    text = requests.post(f"{served}/v1/edit", data=b"hello", headers={"Content-Type": "text/plain"}, timeout=60)
    assert text.status_code == 415 and text.json()["field"] == "content-type"
    array = requests.post(f"{served}/v1/edit", json=[1, 2], timeout=60)
    assert array.status_code == 422 and array.json()["field"] == "body"


def test_multipart_upload_with_a_png_response(served):
    """`curl -F image=@photo.png -F ... -H 'Accept: image/png'`: the picture itself, its facts in headers."""
    fields = {"source_prompt": SOURCE, "target_prompt": TARGET, "guidance": 7, "tau": "none", "seed": 3}
    response = send(served, "/v1/edit", fields, png_bytes((40, 24)), "multipart", headers={"Accept": "image/png"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).size == (40, 24)
    assert response.headers["X-ICD-NFE"] == "8" and response.headers["X-ICD-Mode"] == "switch"
    assert response.headers["X-ICD-Model-Version"]
    # The same edit as JSON gives the same picture: both forms reach the same model call.
    as_json = send(served, "/v1/edit", {**fields, "tau": None}, png_bytes((40, 24)), "json").json()
    assert base64.b64decode(as_json["image"]) == response.content and as_json["nfe"] == 8
    by_field = send(served, "/v1/reconstruct", {"prompt": SOURCE, "response_format": "png"}, png_bytes((20, 30)),
                    "multipart")
    assert by_field.headers["content-type"] == "image/png" and by_field.headers["X-ICD-Mode"] == "reconstruct"
    generated = requests.post(f"{served}/v1/generate", data={"prompt": SOURCE, "width": "48", "height": "40"},
                              headers={"Accept": "image/png"}, timeout=120)
    assert Image.open(io.BytesIO(generated.content)).size == (48, 40)
    refused = send(served, "/v1/invert", {"prompt": SOURCE}, png_bytes(), "multipart", headers={"Accept": "image/png"})
    assert refused.status_code == 406 and refused.json()["field"] == "accept"


def test_an_inverted_latent_can_be_deleted(served):
    inverted = send(served, "/v1/invert", {"prompt": SOURCE}, png_bytes((33, 33), (1, 2, 3)), "multipart").json()
    assert inverted["expires_in_s"] == 86400
    latent_id = inverted["latent_id"]
    assert send(served, "/v1/edit", {"latent_id": latent_id, "target_prompt": TARGET}, None, "json").status_code == 200
    assert requests.delete(f"{served}/v1/latents/{latent_id}", timeout=30).status_code == 204
    gone = send(served, "/v1/edit", {"latent_id": latent_id, "target_prompt": TARGET}, None, "json")
    assert gone.status_code == 404 and gone.json()["field"] == "latent_id"
    again = requests.delete(f"{served}/v1/latents/{latent_id}", timeout=30)
    assert again.status_code == 404 and again.json()["field"] == "latent_id"
    assert requests.delete(f"{served}/v1/latents/nothex", timeout=30).status_code == 422


def test_examples_are_held_out_shapes_images_with_an_edit(served):
    from icd.data.shapes import parse_caption

    examples = requests.get(f"{served}/v1/examples", timeout=60).json()
    assert len(examples) == 6
    for example in examples:
        assert Image.open(io.BytesIO(base64.b64decode(example["image"]))).size == (32, 32)
        source, target = parse_caption(example["source_prompt"]), parse_caption(example["target_prompt"])
        assert source and target and sum(a != b for a, b in zip(source, target)) == 1


def test_openapi_documents_both_forms_and_the_png_response(served):
    paths = requests.get(f"{served}/openapi.json", timeout=30).json()["paths"]
    for path in ("/v1/edit", "/v1/invert", "/v1/reconstruct"):
        content = paths[path]["post"]["requestBody"]["content"]
        assert content["multipart/form-data"]["schema"]["properties"]["image"]["format"] == "binary", path
        assert content["application/json"]["schema"]["properties"]["image"]["format"] == "byte", path
    assert "image/png" in paths["/v1/edit"]["post"]["responses"]["200"]["content"]
    assert "delete" in paths["/v1/latents/{latent_id}"]


def _readme_block(name: str) -> str:
    """The fenced code block after ``<!-- example: name -->`` in serve/README.md."""
    text = (REPO / "serve/README.md").read_text()
    after = text.split(f"<!-- example: {name} -->", 1)[1]
    return after.split("```", 2)[1].split("\n", 1)[1]


@pytest.mark.parametrize("name", ["curl", "requests"])
def test_the_readme_examples_work(served, name, tmp_path):
    from icd.data.shapes import random_sample

    Image.fromarray(random_sample(7).image).save(tmp_path / "photo.png")
    env = {**os.environ, "ICD_SERVE_URL": served}
    command = ["bash", "-euo", "pipefail", "-c", _readme_block(name)] if name == "curl" else \
        [sys.executable, "-c", _readme_block(name)]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert Image.open(tmp_path / "edited.png").size == (32, 32)


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


def test_edits_in_flight_survive_the_editor_replica_being_killed(served):
    """Kill the Editor replica under load: Serve starts another, the Gateway resends the lost calls."""
    import time

    import ray

    bodies = [{"image": png_b64((32, 32), (20 * i, 40, 40)), "source_prompt": SOURCE, "target_prompt": TARGET}
              for i in range(12)]
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True) if "Editor" in a["name"]]
    assert len(replicas) == 1, replicas
    with ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(requests.post, f"{served}/v1/edit", json=b, timeout=300) for b in bodies]
        time.sleep(0.5)
        ray.kill(ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"]), no_restart=True)
        results = [f.result() for f in futures]
    assert [r.status_code for r in results] == [200] * len(bodies), [r.text[:200] for r in results if r.status_code != 200]
    after = [a for a in ray.util.list_named_actors(all_namespaces=True) if "Editor" in a["name"]]
    assert after and after != replicas  # a new replica serves now
