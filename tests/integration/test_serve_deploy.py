"""`icd serve up` on the stack's Ray head: `serve deploy` of serve/config.yaml with the code
fetched from S3, a model from the MLflow registry, the alias moved under traffic (an in-place
`reconfigure`, no failed request), and the web page driven in headless Chromium."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from PIL import Image

from icd.config import load_config
from icd.stack import serving
from icd.train.stages import export_untrained

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MODEL = "icd-serve-deploy-test"
URI = f"models:/{MODEL}@champion"
SOURCE, TARGET = "a red circle on a blue background", "a green circle on a blue background"
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = REPO / ".test-artifacts"  # what a person looks at after the run: the page's screenshot


def png_b64(size=(40, 24), color=(220, 40, 40)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def registered(stack_module_env, tmp_path_factory) -> list[str]:
    """Two registry versions of a freshly initialised toy model; champion -> the first."""
    import mlflow

    from icd.registry.model import log_edit_model

    config = load_config(REPO / "jobs/configs/toy.yaml")
    manifest = export_untrained(config, "deploy-test", str(tmp_path_factory.mktemp("deploy-model")))
    mlflow.set_experiment("icd-serve-deploy-test")
    versions = []
    for _ in range(2):
        with mlflow.start_run():
            versions.append(str(log_edit_model(manifest, config, registered_model=MODEL).registered_model_version))
    mlflow.MlflowClient().set_registered_model_alias(MODEL, "champion", versions[0])
    return versions


@pytest.fixture(scope="module")
def stack_module_env(stack):
    saved = dict(os.environ)
    os.environ.update(stack.client_env())
    yield stack
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def deployed(stack_module_env, registered):
    info = serving.up(stack_module_env, REPO / "serve/config.yaml", model_uri=URI)
    yield info
    serving.down(stack_module_env)


def test_up_serves_the_champion_with_code_fetched_from_s3(deployed, registered, stack):
    assert deployed["version"] == registered[0] and deployed["name"] == MODEL
    assert deployed["url"] == stack.serve_url
    app = serving.status(stack)["applications"]["icd"]
    assert app["status"] == "RUNNING"
    assert requests.get(f"{stack.serve_url}/docs", timeout=30).ok  # OpenAPI UI
    paths = requests.get(f"{stack.serve_url}/openapi.json", timeout=30).json()["paths"]
    assert {"/v1/edit", "/v1/invert", "/v1/reconstruct", "/v1/generate", "/v1/models", "/healthz"} <= set(paths)


def test_moving_the_alias_and_deploying_again_swaps_in_place_without_failing_requests(deployed, registered, stack):
    import mlflow

    url = stack.serve_url
    body = {"image": png_b64(), "source_prompt": SOURCE, "target_prompt": TARGET}
    assert requests.post(f"{url}/v1/edit", json=body, timeout=300).status_code == 200
    calls_before = requests.get(f"{url}/v1/models", timeout=30).json()["calls"]

    outcomes, stop = [], threading.Event()

    def traffic():
        while not stop.is_set():
            response = requests.post(f"{url}/v1/edit", json=body, timeout=300)
            outcomes.append((response.status_code, response.json().get("model_version"), response.text[:300]))

    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for thread in threads:
        thread.start()
    while len(outcomes) < 3:  # requests are flowing on the old version
        threading.Event().wait(0.2)
    mlflow.MlflowClient().set_registered_model_alias(MODEL, "champion", registered[1])
    info = serving.up(stack, REPO / "serve/config.yaml", model_uri=URI)
    while not any(version == registered[1] for _, version, _ in outcomes):
        threading.Event().wait(0.2)
    stop.set()
    for thread in threads:
        thread.join()

    assert info["version"] == registered[1]
    assert [o for o in outcomes if o[0] != 200] == []
    served_versions = [version for _, version, _ in outcomes]
    assert registered[0] in served_versions and registered[1] in served_versions
    # Same replica: its model-call counter kept counting (a restarted replica starts again at 0).
    assert requests.get(f"{url}/v1/models", timeout=30).json()["calls"] > calls_before


def test_up_again_with_nothing_moved_changes_nothing(deployed, stack):
    before = requests.get(f"{stack.serve_url}/v1/models", timeout=30).json()
    after = serving.up(stack, REPO / "serve/config.yaml", model_uri=URI)
    assert (after["version"], after["calls"]) == (before["version"], before["calls"])


def test_an_alias_moved_to_a_broken_version_is_refused_and_the_model_keeps_serving(deployed, stack, monkeypatch):
    import mlflow

    from icd.stack.settings import StackError

    client, url = mlflow.MlflowClient(), stack.serve_url
    good = requests.get(f"{url}/v1/models", timeout=30).json()["version"]
    broken = client.create_model_version(MODEL, source=f"s3://{stack.bucket}/no-such-model", await_creation_for=0)
    client.set_registered_model_alias(MODEL, "champion", broken.version)
    body = {"image": png_b64(), "source_prompt": SOURCE, "target_prompt": TARGET}
    try:
        # before deploying: the version's model cannot be read, nothing is deployed
        with pytest.raises(StackError, match=rf"version {broken.version}: its model cannot be read.*Nothing was deployed"):
            serving.up(stack, REPO / "serve/config.yaml", model_uri=URI)
        assert requests.get(f"{url}/v1/models", timeout=30).json()["version"] == good
        # past that check (a version whose files are there but do not load): the replica refuses the swap
        # and keeps serving; Serve does not replace it (it would, had reconfigure raised)
        calls = requests.get(f"{url}/v1/models", timeout=30).json()["calls"]
        monkeypatch.setattr(serving, "check_servable", lambda uri, version: None)
        with pytest.raises(StackError, match=rf"version {broken.version}: .*still serving {MODEL} version {good}"):
            serving.up(stack, REPO / "serve/config.yaml", model_uri=URI)
        assert serving.status(stack)["applications"]["icd"]["status"] == "RUNNING"
        edit = requests.post(f"{url}/v1/edit", json=body, timeout=300)
        assert edit.status_code == 200 and edit.json()["model_version"] == good
        assert requests.get(f"{url}/v1/models", timeout=30).json()["calls"] > calls  # the same replica
    finally:
        client.set_registered_model_alias(MODEL, "champion", good)
    restored = serving.up(stack, REPO / "serve/config.yaml", model_uri=URI)
    assert restored["version"] == good and restored["refused_update"] is None


@pytest.fixture
def page(deployed, stack):
    """The editor page at / in headless Chromium (Debian's binary: no browser download)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM,
                                             args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.goto(stack.serve_url + "/")
        yield page
        browser.close()


def test_the_web_page_edits_an_uploaded_image_in_chromium(page, tmp_path):
    picture = tmp_path / "upload.png"
    Image.new("RGB", (48, 40), (220, 40, 40)).save(picture)
    assert page.is_disabled("#run")
    page.set_input_files("#file", str(picture))
    page.wait_for_function("!document.getElementById('run').disabled")
    page.fill("#target", "a yellow circle on a blue background")
    page.fill("#guidance", "11")  # a range input takes fill() as its value
    assert page.inner_text("#guidance-value") == "11"
    page.click("#run")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('Done')", timeout=120_000)
    assert "8 UNet passes" in page.inner_text("#status"), page.inner_text("#status")
    sizes = page.evaluate("['original', 'reconstruction', 'edit'].map(id => { const i = document.getElementById(id);"
                          " return [i.naturalWidth, i.naturalHeight]; })")
    assert sizes == [[48, 40]] * 3  # original / reconstruction / edit side by side, at the input's size


PIXELS = """(ids) => ids.map(id => {
  const img = document.getElementById(id), canvas = document.createElement('canvas');
  canvas.width = 32; canvas.height = 32;
  const context = canvas.getContext('2d');
  context.drawImage(img, 0, 0, 32, 32);
  return Array.from(context.getImageData(0, 0, 32, 32).data);
})"""


def mean_abs_difference(a: list[int], b: list[int]) -> float:
    return sum(abs(x - y) for x, y in zip(a, b)) / len(a)


def test_the_web_page_edits_an_example_and_edits_again_from_the_kept_inversion(page):
    """A newcomer's path: pick an example, edit, change only the target, edit again (4 NFE)."""
    page.wait_for_selector("#examples button.example")
    assert page.locator("#examples button.example").count() == 6
    page.click("#examples button.example >> nth=1")
    source, first_target = page.input_value("#source"), page.input_value("#target")
    assert source != first_target and source.startswith("a ")
    page.select_option("#mode", "switch")
    page.fill("#guidance", "7")
    page.fill("#seed", "5")
    page.click("#run")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('Done')", timeout=120_000)
    status = page.inner_text("#status")
    assert "8 UNet passes (4 to invert, 4 to decode)" in status and " s:" in status, status
    original, first_edit = page.evaluate(PIXELS, ["original", "edit"])
    assert mean_abs_difference(original, first_edit) > 2, "the edit did not change the picture"
    assert page.inner_text("#run") == "Edit again"

    other = "a yellow star on a black background" if "yellow" not in first_target else "a white star on a black background"
    page.fill("#target", other)
    page.click("#run")
    page.wait_for_function("document.getElementById('status').textContent.includes('reused')", timeout=120_000)
    assert "4 UNet passes (the inversion was reused)" in page.inner_text("#status")
    (second_edit,) = page.evaluate(PIXELS, ["edit"])
    assert mean_abs_difference(first_edit, second_edit) > 1, "a new target prompt gave the same picture"
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-page-edit.png"), full_page=True)


def test_the_web_page_edits_in_p2p_mode(page):
    page.wait_for_selector("#examples button.example")
    page.click("#examples button.example >> nth=0")
    page.select_option("#mode", "p2p")
    page.fill("#tau", "")
    page.click("#run")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('Done')", timeout=180_000)
    assert "(p2p)" in page.inner_text("#status"), page.inner_text("#status")


def test_the_web_page_shows_an_api_error(page, tmp_path):
    picture = tmp_path / "upload.png"
    Image.new("RGB", (16, 16), (0, 0, 0)).save(picture)
    page.set_input_files("#file", str(picture))
    page.fill("#target", "   ")
    page.click("#run")
    page.wait_for_selector("#status.error", timeout=60_000)
    assert page.inner_text("#status").startswith("target_prompt:"), page.inner_text("#status")


# --- serving and training on one stack ------------------------------------------------------------

COEXIST_SETTINGS = ["data.dataset=serve-coexist-shapes", "data.eval_dataset=null",
                    "train.cfg_distill.steps=2", "train.cfg_distill.global_batch_size=8",
                    "train.cfg_distill.checkpoint_every=2", "train.cfg_distill.images_every=2",
                    "train.cfg_distill.log_every=1"]


def submit_stage(stack, *settings: str, timeout: int = 600) -> tuple[subprocess.CompletedProcess, float]:
    command = [str(BIN / "ray"), "job", "submit", "--working-dir", ".", "--", "python", "jobs/train_stage.py",
               "--stage", "cfg_distill", "--config", "jobs/configs/toy.yaml", "--run", "serve-coexist",
               *[arg for s in (*COEXIST_SETTINGS, *settings) for arg in ("--set", s)]]
    started = time.monotonic()
    done = subprocess.run(command, env={**os.environ, **stack.client_env()}, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    return done, time.monotonic() - started


def test_a_stage_trains_while_the_editor_is_served(deployed, stack):
    """`icd serve up` holds 1 logical CPU, the one the head adds for it: a stage still fits."""
    made = subprocess.run([sys.executable, "jobs/make_shards.py", "--name", "serve-coexist-shapes", "--count", "64",
                           "--per-shard", "32", "--eval-count", "0"], env={**os.environ, **stack.client_env()},
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-2000:]
    assert serving.status(stack)["applications"]["icd"]["status"] == "RUNNING"
    done, seconds = submit_stage(stack)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert seconds < 400, f"a 2-step stage took {seconds:.0f} s beside the served editor"
    assert requests.get(f"{stack.serve_url}/healthz", timeout=30).status_code == 200  # still serving


def test_a_stage_that_cannot_fit_fails_in_seconds_naming_the_editor(deployed, stack):
    done, seconds = submit_stage(stack, "scaling.cpus_per_worker=1.5", "scaling.resources_timeout_s=3",
                                 "train.cfg_distill.lr=2e-4")  # another identity: never the finished one
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    assert "ServeReplica:icd:Editor" in output and "icd serve down" in output, output[-3000:]
    assert seconds < 120, seconds
