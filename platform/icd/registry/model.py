"""The registered model: an MLflow pyfunc wrapping the edit pipeline.

Artifacts: ``model/`` holds the stage output (the guidance-distilled UNet when the base is
not the shipped toy one is needed as weights; the forward and reverse adapters; a manifest
with paths relative to it) and ``config.yaml``, the resolved config. The base VAE and text
encoder are referenced (``toy``, a hub id or an s3:// URI), not copied.

The model is logged as an MLflow "model from code" (``model_code.py``): no pickle is stored, so
loading a version runs no unpickled code. Versions logged earlier (a ``python_model.pkl``) load too.

``predict`` takes a DataFrame with columns ``image`` (PNG/JPEG bytes or base64 of them),
``source_prompt``, ``target_prompt`` and optionally ``guidance``, ``tau``, ``mode``, ``seed``,
and returns ``image`` (base64 PNG, the input's size), ``nfe`` and ``mode``.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import shutil
from pathlib import Path

import mlflow.pyfunc
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema
from PIL import Image

MODEL_DIR, CONFIG_FILE = "model", "config.yaml"
ARTIFACT = "icd_model"  # the pyfunc artifact: artifacts/icd_model/{model/, config.yaml} in a version
MODEL_CODE = Path(__file__).with_name("model_code.py")
MODEL_FORMAT = "models-from-code"  # versions logged before it hold a pickled ICDEditModel; both load
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "image"), ColSpec("string", "source_prompt"), ColSpec("string", "target_prompt"),
                   ColSpec("double", "guidance", required=False), ColSpec("double", "tau", required=False),
                   ColSpec("string", "mode", required=False), ColSpec("long", "seed", required=False)]),
    outputs=Schema([ColSpec("string", "image"), ColSpec("long", "nfe"), ColSpec("string", "mode")]),
)


def package_stage(manifest: dict, config, directory: Path, settings=None) -> Path:
    """Copy a stage's artifacts into ``directory`` with a manifest whose paths are relative to it."""
    from icd.train.stages import local_dir

    directory = Path(directory)
    model_dir = directory / MODEL_DIR
    model_dir.mkdir(parents=True, exist_ok=True)
    packaged = {**manifest, "adapters": {}}
    if manifest.get("unet"):
        shutil.copytree(local_dir(manifest["unet"], settings), model_dir / "unet", dirs_exist_ok=True)
        packaged["unet"] = "unet"
    for name, uri in (manifest.get("adapters") or {}).items():
        shutil.copytree(local_dir(uri, settings), model_dir / "adapters" / name, dirs_exist_ok=True)
        packaged["adapters"][name] = f"adapters/{name}"
    (model_dir / "manifest.json").write_text(json.dumps(packaged, indent=1))
    (directory / CONFIG_FILE).write_text(config.to_yaml())
    return directory


def decode_image(value, row: int) -> Image.Image:
    """Image bytes, or base64 text of them, to a PIL image; the error names the row."""
    data = value
    if isinstance(value, str):
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"row {row}: image is text but not base64") from None
    if not isinstance(data, (bytes, bytearray)):
        raise ValueError(f"row {row}: image must be PNG/JPEG bytes or base64 text, got {type(value).__name__}")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as exc:  # PIL raises many types for bad bytes
        raise ValueError(f"row {row}: image bytes are not a readable image ({type(exc).__name__})") from None
    return image


def encode_png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


class ICDEditModel(mlflow.pyfunc.PythonModel):
    """Edits images: invert with the source prompt (forward adapter), decode with the target (reverse)."""

    def load_context(self, context) -> None:
        from icd.config import load_config
        from icd.editing.pipeline import EditPipeline, inference_placement

        root = Path(context.artifacts[ARTIFACT])
        config = load_config(root / CONFIG_FILE)
        model_dir = root / MODEL_DIR
        manifest = json.loads((model_dir / "manifest.json").read_text())
        if manifest.get("unet"):
            manifest["unet"] = str(model_dir / manifest["unet"])
        manifest["adapters"] = {k: str(model_dir / v) for k, v in manifest["adapters"].items()}
        self.config = config
        device, dtype = inference_placement(config.model.mixed_precision)  # a GPU Serve replica: cuda, bf16
        # The served form: LoRA fused per direction, prompt cache, compiled when configured.
        self.pipeline = EditPipeline.from_manifest(manifest, config.editing, config.model.resolution, device=device,
                                                   dtype=dtype, serving=config.serving)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        missing = {"image", "source_prompt", "target_prompt"} - set(model_input.columns)
        if missing:
            raise ValueError(f"model input is missing column(s) {sorted(missing)}; expected image, source_prompt, "
                             "target_prompt and optionally guidance, tau, mode, seed")
        outputs = []
        for i, row in enumerate(model_input.to_dict("records")):
            image = decode_image(row["image"], i)
            options = {k: row[k] for k in ("guidance", "tau", "mode") if k in row and pd.notna(row[k])}
            result = self.pipeline.edit([image], [str(row["source_prompt"])], [str(row["target_prompt"])],
                                        seed=int(row.get("seed", 0) or 0), **options)
            outputs.append({"image": encode_png(result.images[0]), "nfe": result.nfe,
                            "mode": options.get("mode", self.config.editing.mode)})
        return pd.DataFrame(outputs)


def log_edit_model(manifest: dict, config, settings=None, registered_model: str | None = None,
                   metrics: dict | None = None):
    """Log the model in the active MLflow run (and register it); returns the ModelInfo."""
    import tempfile

    import icd

    with tempfile.TemporaryDirectory(prefix="icd-package-") as tmp:
        # MLflow keeps an artifact directory under its own name: artifacts/icd_model/ in every version
        # (the plain-diffusers recipe in the README reads it there).
        package = package_stage(manifest, config, Path(tmp) / ARTIFACT, settings)
        # An explicit signature and requirements: inferring them would load the model at log time.
        # A model from code (model_code.py, which MLflow runs at load), not a pickled ICDEditModel.
        return mlflow.pyfunc.log_model(
            name="model", python_model=str(MODEL_CODE), artifacts={ARTIFACT: str(package)},
            code_paths=[str(Path(icd.__file__).parent)], pip_requirements=requirements(),
            signature=SIGNATURE, registered_model_name=registered_model,
            metadata={"stage": manifest["stage"], "identity": manifest["identity"], "base": manifest["base"],
                      "format": MODEL_FORMAT, **({"metrics": metrics} if metrics else {})})


FORMAT_TAG, NOTE_TAG = "icd.format", "icd.note"
PICKLED = "pickled-python-model"
PICKLED_NOTE = ("logged before models from code: loading it unpickles python_model.pkl, which runs code from the "
                "pickle and needs the Python and cloudpickle it was written with; it still loads. Register the "
                "model again (jobs/train_icd.py reuses every stage) to drop the pickle")


def tag_pickled_version(client, name: str, version: str) -> bool:
    """Tag a version logged as a pickled PythonModel (``icd.format``, ``icd.note``); True if it is one.

    Called where a version is put to use (Serve loading it, promotion), so old versions in a
    registry say what they are without anyone re-registering them first.
    """
    metadata = _version_metadata(client, name, version)
    if metadata is None or metadata.get("format") == MODEL_FORMAT:
        return False  # a model from code, or no MLmodel to read (nothing to say about it)
    if client.get_model_version(name, str(version)).tags.get(FORMAT_TAG) != PICKLED:
        client.set_model_version_tag(name, str(version), FORMAT_TAG, PICKLED)
        client.set_model_version_tag(name, str(version), NOTE_TAG, PICKLED_NOTE)
    return True


def _version_metadata(client, name: str, version: str) -> dict | None:
    """The ``metadata`` of a version's MLmodel file (read through ``client``'s registry), or None if unreadable."""
    import mlflow.artifacts
    from mlflow.models import Model

    try:
        location = client.get_model_version_download_uri(name, str(version)).rstrip("/")
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"{location}/MLmodel",
                                                    tracking_uri=client._tracking_client.tracking_uri)
    except Exception:  # no artifacts behind the version (or no access to them)
        return None
    return Model.load(local).metadata or {}


def requirements() -> list[str]:
    """The pinned runtime packages the model needs (its own code ships in code_paths)."""
    from importlib.metadata import version

    names = ("torch", "torchvision", "diffusers", "transformers", "peft", "safetensors", "pillow", "pyarrow",
             "pydantic", "pyyaml", "mlflow", "boto3")
    return [f"{name}=={version(name)}" for name in names]
