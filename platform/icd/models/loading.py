"""Build or load the base components from "toy", a hub id, a local directory or an s3:// URI.

Always the diffusers layout (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``; SDXL adds ``text_encoder_2/`` and ``tokenizer_2/``) and always safetensors: a
pickle checkpoint (.bin/.pt/.ckpt/.pth/.pkl) can run arbitrary code when loaded, so it is refused
with an error saying how to convert it.

SDXL is recognised by its UNet (``addition_embed_type="text_time"``). Its VAE overflows in fp16
(NaN images), so in fp16 it stays in fp32 unless ``vae`` names a VAE fixed for fp16
(e.g. ``madebyollin/sdxl-vae-fp16-fix``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from icd.diffusion.schedule import scaled_linear_alphas_cumprod
from icd.models.bundle import ModelBundle
from icd.models.tokenizer import offline_clip_tokenizer
from icd.models.toy import TOY_BASE_DIR
from icd.storage import S3Settings, filesystem_for, is_s3_uri

COMPONENTS = ("unet", "vae", "text_encoder")
SDXL_COMPONENTS = ("text_encoder_2",)  # beside COMPONENTS, in an SDXL directory
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class ModelLoadError(RuntimeError):
    """A base model that cannot be loaded; the message names the file or field."""


def refuse_pickles(directory: Path) -> None:
    """Raise unless every component folder holds safetensors weights."""
    for component in (*COMPONENTS, *(c for c in SDXL_COMPONENTS if (directory / c).exists())):
        folder = directory / component
        if not folder.is_dir():
            raise ModelLoadError(f"{directory} is not in diffusers layout: missing {component}/")
        if any(folder.glob("*.safetensors")):
            continue
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ModelLoadError(
                f"{folder / pickles[0]} is a pickle checkpoint; only safetensors are loaded (a pickle can run "
                "code). Convert it with save_pretrained(..., safe_serialization=True)."
            )
        raise ModelLoadError(f"no *.safetensors weights in {folder}")


def download_s3_model(uri: str, cache_dir: Path | None = None, settings: S3Settings | None = None) -> Path:
    """Copy an s3:// model directory to a local cache (once per URI) and return the local path."""
    from pyarrow import fs as pafs

    cache_dir = Path(cache_dir or os.environ.get("ICD_MODEL_CACHE", Path.home() / ".cache" / "icd" / "models"))
    local = cache_dir / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    marker = local / ".complete"
    if marker.exists():
        return local
    s3, path = filesystem_for(uri, settings)
    if s3.get_file_info(path).type != pafs.FileType.Directory:
        raise ModelLoadError(f"{uri} is not a directory in object storage")
    local.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(local), source_filesystem=s3, destination_filesystem=pafs.LocalFileSystem())
    marker.write_text(uri)
    return local


def _alphas_cumprod(directory: Path | None, hub_id: str | None, revision: str | None) -> torch.Tensor:
    config = None
    if directory is not None and (directory / "scheduler" / "scheduler_config.json").exists():
        config = json.loads((directory / "scheduler" / "scheduler_config.json").read_text())
    elif hub_id is not None:
        from diffusers import DDIMScheduler

        config = DDIMScheduler.load_config(hub_id, subfolder="scheduler", revision=revision)
    if config is None:
        return scaled_linear_alphas_cumprod()
    if config.get("beta_schedule", "scaled_linear") != "scaled_linear":
        raise ModelLoadError(f"scheduler beta_schedule {config['beta_schedule']!r}: expected 'scaled_linear'")
    if config.get("prediction_type", "epsilon") != "epsilon":
        raise ModelLoadError(f"scheduler prediction_type {config['prediction_type']!r}: expected 'epsilon'")
    return scaled_linear_alphas_cumprod(config["beta_start"], config["beta_end"], config["num_train_timesteps"])


def load_bundle(base: str, revision: str | None = None, dtype: torch.dtype = torch.float32,
                device: str | torch.device = "cpu", cache_dir: Path | None = None,
                vae: str | None = None) -> ModelBundle:
    """Load the base model named by ``base`` ("toy", hub id, directory or s3:// URI) as a `ModelBundle`.

    ``vae``: another VAE (hub id, directory or s3:// URI, diffusers ``AutoencoderKL`` layout), e.g.
    SDXL's fp16-fixed one; None keeps the base's.
    """
    source, hub_id = _locate(base, cache_dir)
    if source is not None:
        refuse_pickles(source)
    where = str(source) if source is not None else hub_id
    kwargs = dict(use_safetensors=True, torch_dtype=dtype)
    if hub_id is not None:
        kwargs["revision"] = revision
    try:
        unet = UNet2DConditionModel.from_pretrained(where, subfolder="unet", **kwargs)
        sdxl = unet.config.get("addition_embed_type") == "text_time"
        vae_dtype = torch.float32 if sdxl and dtype == torch.float16 and vae is None else dtype
        if vae is None:
            vae_model = AutoencoderKL.from_pretrained(where, subfolder="vae", **{**kwargs, "torch_dtype": vae_dtype})
        else:
            vae_where = _locate(vae, cache_dir)[0] or vae
            vae_model = AutoencoderKL.from_pretrained(str(vae_where), use_safetensors=True, torch_dtype=vae_dtype)
        text_encoder = CLIPTextModel.from_pretrained(where, subfolder="text_encoder", **kwargs)
        text_encoder_2 = (CLIPTextModelWithProjection.from_pretrained(where, subfolder="text_encoder_2", **kwargs)
                          if sdxl else None)
    except (OSError, EnvironmentError) as exc:
        if hub_id is not None:
            raise ModelLoadError(
                f"cannot load model.base={base!r} from the Hugging Face hub ({str(exc).splitlines()[0]}); "
                "without hub access, point model.base at a local diffusers directory or an s3:// URI"
            ) from None
        raise ModelLoadError(f"cannot load model.base={base!r}: {exc}") from None
    tokenizer = _tokenizer(source, where, hub_id, revision, "tokenizer", "<|endoftext|>")
    extra = {}
    if sdxl:
        extra = dict(text_encoder_2=text_encoder_2, tokenizer_2=_tokenizer(source, where, hub_id, revision,
                                                                             "tokenizer_2", "!"),
                     zero_empty_prompt=bool(_pipeline_config(source, hub_id, revision).get(
                         "force_zeros_for_empty_prompt", True)))
    bundle = ModelBundle(unet=unet, vae=vae_model, text_encoder=text_encoder, tokenizer=tokenizer,
                         alphas_cumprod=_alphas_cumprod(source, hub_id, revision), source=base, **extra)
    for module in (unet, vae_model, *bundle.text_encoders):
        module.to(device).eval().requires_grad_(False)
    return bundle


def _locate(base: str, cache_dir: Path | None) -> tuple[Path | None, str | None]:
    """(local directory, None) for "toy", a directory or an s3:// URI (copied to a local cache); (None, hub id) else."""
    if base == "toy":
        if not (TOY_BASE_DIR / "unet").is_dir():
            raise ModelLoadError(f"the toy base model is missing from {TOY_BASE_DIR}; run jobs/pretrain_toy_base.py")
        return TOY_BASE_DIR, None
    if is_s3_uri(base):
        return download_s3_model(base, cache_dir), None
    if Path(base).expanduser().is_dir():
        return Path(base).expanduser(), None
    if Path(base).expanduser().exists():
        raise ModelLoadError(f"model.base={base!r} is a file; expected a diffusers directory, hub id or s3:// URI")
    return None, base


def _tokenizer(source: Path | None, where: str, hub_id: str | None, revision: str | None, subfolder: str,
               pad_token: str) -> CLIPTokenizer:
    """The base's CLIP tokenizer, or the offline one when a local copy ships without its vocabulary."""
    if source is not None and not (source / subfolder / "vocab.json").exists():
        return offline_clip_tokenizer(pad_token=pad_token)
    return CLIPTokenizer.from_pretrained(where, subfolder=subfolder, **({"revision": revision} if hub_id else {}))


def _pipeline_config(source: Path | None, hub_id: str | None, revision: str | None) -> dict:
    """``model_index.json`` (the pipeline's config: SDXL's ``force_zeros_for_empty_prompt``); {} if absent."""
    if source is not None:
        path = source / "model_index.json"
        return json.loads(path.read_text()) if path.exists() else {}
    from diffusers import DiffusionPipeline

    try:
        return dict(DiffusionPipeline.load_config(hub_id, revision=revision))
    except (OSError, EnvironmentError):
        return {}


def base_unet_config(base: str, revision: str | None = None, cache_dir: Path | None = None) -> dict:
    """The base model's ``unet/config.json`` (toy, directory, s3:// URI or hub id) without loading weights."""
    if base == "toy":
        folder = TOY_BASE_DIR
    elif is_s3_uri(base):
        folder = download_s3_model(base, cache_dir)
    elif Path(base).expanduser().is_dir():
        folder = Path(base).expanduser()
    else:
        try:
            return dict(UNet2DConditionModel.load_config(base, subfolder="unet", revision=revision))
        except (OSError, EnvironmentError) as exc:
            raise ModelLoadError(f"cannot read model.base={base!r}'s unet config from the hub "
                                 f"({str(exc).splitlines()[0]}); point it at a local directory or s3:// URI") from None
    path = folder / "unet" / "config.json"
    if not path.exists():
        raise ModelLoadError(f"model.base={base!r} has no unet/config.json (expected diffusers layout)")
    return json.loads(path.read_text())


def save_bundle(bundle: ModelBundle, directory: str | Path) -> Path:
    """Write the base components in diffusers layout (safetensors), loadable by `load_bundle`."""
    from icd.models.toy import sd_scheduler

    directory = Path(directory)
    for name in (*COMPONENTS, *(SDXL_COMPONENTS if bundle.is_sdxl else ())):
        getattr(bundle, name).save_pretrained(directory / name, safe_serialization=True)
    bundle.tokenizer.save_pretrained(directory / "tokenizer")
    sd_scheduler().save_pretrained(directory / "scheduler")
    if bundle.is_sdxl:
        bundle.tokenizer_2.save_pretrained(directory / "tokenizer_2")
        (directory / "model_index.json").write_text(json.dumps({
            "_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": bundle.zero_empty_prompt}))
    return directory
