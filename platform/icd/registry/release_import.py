"""Bring published iCD checkpoints into the registry: fetch, check, convert, register.

`prepare_release` reads the teacher and the two LoRA files (local path, ``s3://`` URI or hub
file id), refuses what is unsafe or does not fit (`icd.registry.releases`), and writes a stage
output in this project's layout: ``unet/`` (diffusers, safetensors) and ``adapters/icd_forward``,
``adapters/icd_reverse`` (PEFT / diffusers LoRA format with the alpha written down), plus a
manifest. Nothing touches MLflow until every check has passed; `register_release` then logs
that output as a version of a registered model, the same pyfunc the DAG registers.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch

from icd.diffusion.boundaries import Boundaries
from icd.models.bundle import FORWARD, REVERSE
from icd.registry.releases import (OFFICIAL_LORA_ALPHA, RELEASED_BOUNDARIES, ReleaseError, boundaries_in_name,
                                   check_lora_matches, lora_modules, lora_rank, peft_lora_state,
                                   release_boundaries, teacher_guidance_dim)
from icd.storage import S3Settings, filesystem_for, is_s3_uri

STAGE = "release"  # the manifest's stage of an imported model (the DAG's are cfg_distill / icd / cycle)
TAG_PREFIX = "icd.source"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


# --- inputs -----------------------------------------------------------------------------------

def fetch(source: str, flag: str, cache_dir: Path | None = None, settings: S3Settings | None = None) -> Path:
    """A local path for ``source``: the path itself, a copy of an ``s3://`` object, or a hub file.

    A hub file is ``<owner>/<repo>/<file>`` (or ``hf://<owner>/<repo>/<file>``), e.g.
    ``ilushado/Cycle-consistency/finetuned_forward_model.safetensors``.
    """
    cache_dir = Path(cache_dir or os.environ.get("ICD_MODEL_CACHE", Path.home() / ".cache" / "icd" / "models"))
    if is_s3_uri(source):
        from pyarrow import fs as pafs

        s3, path = filesystem_for(source, settings)
        info = s3.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise ReleaseError(f"{flag} {source}: no such object in storage")
        local = cache_dir / "releases" / hashlib.sha256(source.encode()).hexdigest()[:16] / path.rsplit("/", 1)[-1]
        if not local.exists():
            local.parent.mkdir(parents=True, exist_ok=True)
            if info.type == pafs.FileType.Directory:
                pafs.copy_files(path, str(local), source_filesystem=s3, destination_filesystem=pafs.LocalFileSystem())
            else:
                partial = local.with_name(local.name + ".partial")
                pafs.copy_files(path, str(partial), source_filesystem=s3,
                                destination_filesystem=pafs.LocalFileSystem())
                partial.rename(local)
        return local
    local = Path(source).expanduser()
    if local.exists():
        return local
    hub = source.removeprefix("hf://")
    parts = hub.split("/")
    if source.startswith("hf://") or (len(parts) >= 3 and not source.startswith((".", "/", "~"))):
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download("/".join(parts[:2]), "/".join(parts[2:])))
        except Exception as exc:  # offline, unknown repo or file: say which input and how else to give it
            raise ReleaseError(f"{flag} {source}: cannot download it from the Hugging Face hub "
                               f"({type(exc).__name__}); without hub access give a local path or an s3:// URI") from None
    raise ReleaseError(f"{flag} {source}: no such file; expected a local path, an s3:// URI or a hub file "
                       "id <owner>/<repo>/<file>")


def sha256(path: Path) -> str:
    """The file's sha256; for a directory, over its files' relative names and contents."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def read_state(path: Path, flag: str) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, a tensor-only pickle (never unpickling code) or a diffusers directory."""
    from safetensors.torch import load_file

    if path.is_dir():
        folder = path / "unet" if (path / "unet").is_dir() else path
        weights = sorted(folder.glob("*.safetensors"))
        if not weights:
            pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
            hint = f" (found {pickles[0]}: pass that file itself)" if pickles else ""
            raise ReleaseError(f"{flag} {path}: a directory without *.safetensors weights{hint}")
        state = {}
        for file in weights:
            state.update(load_file(file))
        return state
    if path.suffix == ".safetensors":
        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ReleaseError(f"{flag} {path} is not a tensor-only checkpoint: loading it would run code from the "
                           f"pickle ({reason[:200]}). Re-save it as a plain state dict (torch.save(unet.state_dict(), "
                           "...)) or as safetensors") from None
    except Exception as exc:
        raise ReleaseError(f"{flag} {path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and set(state) == {"state_dict"}:
        state = state["state_dict"]
    return state


# --- the model --------------------------------------------------------------------------------

def build_teacher(base_unet_config: dict, state: dict[str, torch.Tensor], source: str):
    """The guidance-distilled UNet: the base's architecture with the teacher's ``time_cond_proj_dim``, its weights."""
    from diffusers import UNet2DConditionModel

    dim = teacher_guidance_dim(state, source, base_is_sdxl=base_unet_config.get("addition_embed_type") == "text_time")
    config = {k: v for k, v in base_unet_config.items() if not k.startswith("_")}
    with torch.device("meta"):  # no throw-away random init of ~860M parameters
        unet = UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": dim})
    result = unet.load_state_dict(state, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        parts = [f"missing keys {sorted(result.missing_keys)[:3]}" if result.missing_keys else "",
                 f"unexpected keys {sorted(result.unexpected_keys)[:3]}" if result.unexpected_keys else ""]
        raise ReleaseError(f"{source} does not fit the base UNet (model.base's unet/config.json with "
                           f"time_cond_proj_dim={dim}): {'; '.join(p for p in parts if p)}")
    try:
        unet.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:  # size mismatches
        raise ReleaseError(f"{source} does not fit the base UNet: {str(exc).splitlines()[1].strip()}") from None
    if any(t.is_meta for t in (*unet.parameters(), *unet.buffers())):
        raise ReleaseError(f"{source}: the state dict left UNet tensors unset")
    return unet.eval().requires_grad_(False)


def write_adapter(unet, name: str, peft_state: dict[str, torch.Tensor], alpha: float, directory: Path) -> Path:
    """Attach the file's LoRA as adapter ``name`` (its rank, the given alpha) and save it in our layout."""
    from peft import LoraConfig, set_peft_model_state_dict

    from icd.models.adapters import save_adapter, several_adapters_expected

    modules = sorted(lora_modules(peft_state))
    config = LoraConfig(r=lora_rank(peft_state, name), lora_alpha=alpha, target_modules=modules)
    with several_adapters_expected():
        unet.add_adapter(config, adapter_name=name)
    dtype = next(p for n, p in unet.named_parameters() if f".{name}." in n).dtype
    result = set_peft_model_state_dict(unet, {k: v.to(dtype) for k, v in peft_state.items()}, adapter_name=name)
    unexpected = [k for k in result.unexpected_keys if "lora_" in k]
    if unexpected:  # check_lora_matches ran first; this guards the conversion itself
        raise ReleaseError(f"adapter {name}: PEFT did not place {unexpected[:3]}")
    return save_adapter(unet, name, directory)


@dataclass
class Release:
    """A checked, converted release in a local stage-output directory, ready to register."""

    directory: Path
    manifest: dict
    boundaries: Boundaries
    rank: int
    sources: dict[str, dict[str, str]] = field(default_factory=dict)  # role -> {"uri": ..., "sha256": ...}

    @property
    def start_timestep(self) -> int:
        return self.boundaries.forward_timesteps[0]


def prepare_release(teacher: str, reverse: str, forward: str, base: str, directory: Path,
                    revision: str | None = None, start_timestep: int | None = None,
                    reverse_timesteps: tuple[int, ...] | None = None, forward_timesteps: tuple[int, ...] | None = None,
                    lora_alpha: float = OFFICIAL_LORA_ALPHA, settings: S3Settings | None = None,
                    cache_dir: Path | None = None) -> Release:
    """Fetch, check and convert a release into ``directory``; raises `ReleaseError` before writing anything bad."""
    from icd.models.loading import base_unet_config

    paths = {"teacher": fetch(teacher, "--teacher", cache_dir, settings),
             "reverse": fetch(reverse, "--reverse", cache_dir, settings),
             "forward": fetch(forward, "--forward", cache_dir, settings)}
    boundaries = release_boundaries(
        reverse_timesteps or _named(reverse, "reverse", "--reverse"),
        forward_timesteps or _named(forward, "forward", "--forward"), start_timestep)
    adapters = {}
    for role, name in (("reverse", REVERSE), ("forward", FORWARD)):
        adapters[name] = peft_lora_state(read_state(paths[role], f"--{role}"), f"--{role} {paths[role].name}")
    ranks = {name: lora_rank(state, name) for name, state in adapters.items()}
    unet = build_teacher(base_unet_config(base, revision), read_state(paths["teacher"], "--teacher"),
                         f"--teacher {paths['teacher'].name}")
    for role, name in (("reverse", REVERSE), ("forward", FORWARD)):
        check_lora_matches(adapters[name], unet, f"--{role} {paths[role].name}")

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(directory / "unet", safe_serialization=True)  # before any adapter joins it
    for name, state in adapters.items():
        write_adapter(unet, name, state, lora_alpha, directory / "adapters" / name)
    sources = {role: {"uri": uri, "sha256": sha256(paths[role])}
               for role, uri in (("teacher", teacher), ("reverse", reverse), ("forward", forward))}
    identity = hashlib.sha256(json.dumps([sources[r]["sha256"] for r in ("teacher", "reverse", "forward")]
                                         + [list(boundaries.forward_timesteps), lora_alpha]).encode()).hexdigest()[:12]
    manifest = {"stage": STAGE, "identity": identity, "base": base, "revision": revision,
                "unet": str(directory / "unet"),
                "adapters": {name: str(directory / "adapters" / name) for name in adapters},
                "boundaries": {"reverse": list(boundaries.reverse_timesteps),
                               "forward": list(boundaries.forward_timesteps)},
                "output": str(directory), "sources": sources, "lora": {"rank": ranks[REVERSE], "alpha": lora_alpha}}
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return Release(directory, manifest, boundaries, ranks[REVERSE], sources)


def _named(source: str, direction: str, flag: str) -> tuple[int, ...] | None:
    named = boundaries_in_name(source)
    if named is None:
        return None
    if named[0] != direction:
        raise ReleaseError(f"{flag} {source}: the name says it is the {named[0]} model; expected the {direction} one")
    return named[1]


# --- the registry -----------------------------------------------------------------------------

def release_config(config, release: Release):
    """The preset's config with what the release fixes: base, LoRA shape and boundaries."""
    model = config.model.model_copy(update={"base": release.manifest["base"],
                                            "revision": release.manifest["revision"],
                                            "lora_rank": release.rank,
                                            "lora_alpha": release.manifest["lora"]["alpha"]})
    method = config.method.model_copy(update={"reverse_timesteps": list(release.boundaries.reverse_timesteps),
                                              "forward_timesteps": list(release.boundaries.forward_timesteps)})
    return config.model_copy(update={"model": model, "method": method})


def register_release(release: Release, config, name: str, alias: str | None = None,
                     experiment: str = "icd-imports") -> dict:
    """Log the release as a version of registered model ``name`` (tags: each file's URI and sha256)."""
    import mlflow

    from icd.registry.model import log_edit_model
    from icd.train.tracking import tracking_uri, training_experiment

    uri = tracking_uri(config)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    experiment_id = training_experiment(client, experiment)
    config = release_config(config, release)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"import-{name}",
                          tags={"icd.stage": STAGE, "icd.identity": release.manifest["identity"]}):
        mlflow.log_params({f"{role}.uri": source["uri"][:500] for role, source in release.sources.items()})
        info = log_edit_model(release.manifest, config, registered_model=name)
    version = str(info.registered_model_version)
    tags = {"icd.identity": release.manifest["identity"], "icd.stage": STAGE,
            "icd.boundaries": json.dumps(release.manifest["boundaries"]),
            "icd.start_timestep": str(release.start_timestep)}
    for role, source in release.sources.items():
        tags[f"{TAG_PREFIX}.{role}"] = source["uri"]
        tags[f"{TAG_PREFIX}.{role}.sha256"] = source["sha256"]
    if tuple(sorted(release.boundaries.reverse_timesteps)) not in RELEASED_BOUNDARIES:
        tags["icd.note"] = "boundaries are not one of the released sets"
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    if alias:
        client.set_registered_model_alias(name, alias, version)
    return {"name": name, "version": int(version), "boundaries": release.manifest["boundaries"],
            "start_timestep": release.start_timestep, **({"alias": alias} if alias else {})}
