"""The registered edit model: logged, registered, loaded back by models:/ URI, and predicting."""

import base64
import io
import os
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from icd.config import load_config
from icd.registry.model import decode_image, encode_png, log_edit_model, tag_pickled_version
from icd.train.stages import StagePaths, build_stage_model, export_stage, make_manifest


@pytest.fixture(scope="module")
def icd_manifest(tmp_path_factory):
    """An untrained but complete icd output (cfg_distill -> icd), exported like the jobs export it."""
    root = str(tmp_path_factory.mktemp("stages"))
    config = load_config("jobs/configs/toy.yaml")
    previous = None
    for stage in ("cfg_distill", "icd"):
        model = build_stage_model(stage, config, previous)
        paths = StagePaths.of(config, stage, "registry-test", root)
        export_stage(model, paths.output)
        previous = make_manifest(paths, config, previous, 0, [])
    return config, previous


@pytest.fixture
def local_mlflow(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    experiment = mlflow.create_experiment("registry-test", artifact_location=str(tmp_path / "artifacts"))
    yield experiment
    mlflow.set_tracking_uri(None)
    # set_registry_uri also exports MLFLOW_REGISTRY_URI, which set_registry_uri(None) leaves behind:
    # later tests (and their subprocesses) would register into this test's database
    os.environ.pop("MLFLOW_REGISTRY_URI", None)
    mlflow.set_registry_uri(None)


def png_bytes(size, color=(220, 40, 40)):
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_logged_model_loads_by_registry_uri_and_edits_at_the_input_size(icd_manifest, local_mlflow):
    config, manifest = icd_manifest
    with mlflow.start_run(experiment_id=local_mlflow):
        info = log_edit_model(manifest, config, registered_model="icd-unit")
    assert info.registered_model_version == 1
    model = mlflow.pyfunc.load_model("models:/icd-unit/1")
    frame = pd.DataFrame({
        "image": [png_bytes((40, 24)), base64.b64encode(png_bytes((32, 32))).decode()],
        "source_prompt": ["a red square on a black background"] * 2,
        "target_prompt": ["a blue square on a black background"] * 2,
        "guidance": [7.0, 3.0],
    })
    out = model.predict(frame)
    assert list(out["nfe"]) == [8, 8] and list(out["mode"]) == ["switch", "switch"]
    # optional columns reach the pipeline (an untrained w-embedding ignores w, so change the mode)
    other = model.predict(frame.assign(mode=["p2p", None]))
    assert list(other["mode"]) == ["p2p", "switch"]
    assert other["image"][0] != out["image"][0] and other["image"][1] == out["image"][1]
    first = Image.open(io.BytesIO(base64.b64decode(out["image"][0])))
    assert first.size == (40, 24)
    assert np.asarray(first).std() > 0  # a decoded picture, not a constant


def test_bad_rows_get_errors_that_name_the_row_and_field(icd_manifest):
    with pytest.raises(ValueError, match="row 2: image is text but not base64"):
        decode_image("not base64!", 2)
    with pytest.raises(ValueError, match="row 0: image bytes are not a readable image"):
        decode_image(b"GIF89a-but-not-really", 0)
    with pytest.raises(ValueError, match="row 1: image must be"):
        decode_image(3.5, 1)
    assert decode_image(encode_png(Image.new("RGB", (5, 7))), 0).size == (5, 7)


def test_the_model_is_logged_from_code_with_no_pickle(icd_manifest, local_mlflow):
    from mlflow.artifacts import download_artifacts

    config, manifest = icd_manifest
    with mlflow.start_run(experiment_id=local_mlflow):
        info = log_edit_model(manifest, config, registered_model="icd-code")
    local = Path(download_artifacts(info.model_uri))
    files = [p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()]
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))], files
    assert "model_code.py" in {Path(f).name for f in files}
    loaded = mlflow.pyfunc.load_model(info.model_uri)
    assert loaded.metadata.metadata["format"] == "models-from-code"
    out = loaded.predict(pd.DataFrame({"image": [png_bytes((20, 20))], "source_prompt": ["a red square on a black background"],
                                       "target_prompt": ["a blue square on a black background"]}))
    assert list(out["nfe"]) == [8]


def test_a_version_logged_as_a_pickle_still_loads(icd_manifest, local_mlflow, tmp_path):
    """What versions logged before models-from-code hold: python_model.pkl."""
    import tempfile

    import icd
    from icd.registry.model import SIGNATURE, ICDEditModel, package_stage

    config, manifest = icd_manifest
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(experiment_id=local_mlflow):
        package_stage(manifest, config, Path(tmp))
        info = mlflow.pyfunc.log_model(name="model", python_model=ICDEditModel(), artifacts={"icd_model": tmp},
                                       code_paths=[str(Path(icd.__file__).parent)], signature=SIGNATURE,
                                       pip_requirements=[], registered_model_name="icd-pickled")
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    assert "icd.format" not in client.get_model_version("icd-pickled", version).tags
    # Serve loads it (and notes in the registry what it is); it edits as before
    from serve.editor import load_model

    loaded = load_model(f"models:/icd-pickled/{version}")
    tags = client.get_model_version("icd-pickled", version).tags
    assert tags["icd.format"] == "pickled-python-model" and "unpickles python_model.pkl" in tags["icd.note"]
    result = loaded.pipeline.edit([Image.new("RGB", (20, 20), (200, 0, 0))], ["a red square"], ["a blue square"])
    assert result.nfe == 8
    # a model from code is not tagged
    with mlflow.start_run(experiment_id=local_mlflow):
        fresh = log_edit_model(manifest, config, registered_model="icd-pickled")
    assert not tag_pickled_version(client, "icd-pickled", str(fresh.registered_model_version))
    assert "icd.format" not in client.get_model_version("icd-pickled", str(fresh.registered_model_version)).tags
