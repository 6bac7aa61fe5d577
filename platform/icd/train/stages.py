"""The three stages: identity, where their outputs live, how their models are built and exported.

Each stage's output is a directory of diffusers / PEFT artifacts plus ``manifest.json``
(written last, so a manifest means a complete output) that the next stage, the evaluation
and the server read:

    s3://<bucket>/models/<run>/cfg_distill-<identity>/unet/             guidance-distilled UNet
    s3://<bucket>/models/<run>/icd-<identity>/adapters/icd_{forward,reverse}/
    s3://<bucket>/models/<run>/cycle-<identity>/adapters/icd_{forward,reverse}/

A stage's identity hashes what determines its result (model, data, method, its own train
settings and its input's identity), so a changed setting gives a new output and a new
Ray Train run name, never a resume from an incompatible checkpoint.
"""

from __future__ import annotations

import copy
import hashlib
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from icd.config import Config
from icd.diffusion.boundaries import Boundaries
from icd.models.bundle import FORWARD, REVERSE, ModelBundle
from icd.storage import S3Settings, filesystem_for, is_s3_uri, read_json
from icd.train.target import EMATarget

STAGES = ("cfg_distill", "icd", "cycle")
PREVIOUS = {"cfg_distill": None, "icd": "cfg_distill", "cycle": "icd"}
MANIFEST = "manifest.json"
# The method settings CFG distillation depends on (the schedule and the guidance scales).
GUIDANCE_METHOD_FIELDS = ("num_train_timesteps", "beta_start", "beta_end", "guidance_scales")


# (section, field) -> the value that trains exactly as before the field existed.
ADDED_LATER = {("method", "target_ema_decay"): 0.0, ("train", "lr_scheduler"): "constant",
               ("train", "lr_warmup_steps"): 0, ("method", "preservation_clean_end"): "renoise",
               ("model", "lora_init"): "gaussian", ("method", "reverse_guidance_scales"): None,
               ("model", "vae"): None, ("train", "step_per_term"): False,
               ("method", "consistency_space"): "latent", ("data", "preserve_order"): False}


def check_stage(stage: str) -> str:
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r}: expected one of {', '.join(STAGES)}")
    return stage


def stage_identity(config: Config, stage: str) -> str:
    """sha256 of the settings that determine the stage's result, including its input stage's identity."""
    check_stage(stage)
    parts = {"stage": stage, "preset": config.preset, "seed": config.seed,
             **{name: getattr(config, name).model_dump(mode="json") for name in ("model", "data", "method")},
             "train": getattr(config.train, stage).model_dump(mode="json")}
    if stage == "cfg_distill":  # boundaries and preservation weights are the later stages' business
        parts["method"] = {k: v for k, v in parts["method"].items() if k in GUIDANCE_METHOD_FIELDS}
    # Settings added after outputs existed are hashed only when they change the training, so those
    # outputs keep their identities (and a resubmitted run still finds them).
    for section, key in ADDED_LATER:
        if key in parts[section] and parts[section][key] == ADDED_LATER[section, key]:
            parts[section].pop(key)
    # Logging and checkpoint cadence do not change the weights (the draws are seeded per step).
    for key in ("log_every", "images_every", "checkpoint_every", "keep_checkpoints"):
        parts["train"].pop(key)
    # The validation split only chooses which checkpoint is exported: it is part of the identity of the
    # stages that export their best checkpoint (with the cadence that makes the candidates), no other.
    validation = parts["data"].pop("validation_dataset", None)
    if parts["train"].pop("export", "last") == "best_validation":
        parts["train"].update(export="best_validation", validation_dataset=validation,
                              checkpoint_every=getattr(config.train, stage).checkpoint_every)
    else:
        parts["train"].pop("validation_count", None)
    if PREVIOUS[stage]:
        parts["input"] = stage_identity(config, PREVIOUS[stage])
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def default_run_name(config: Config) -> str:
    return f"{config.preset}-{stage_identity(config, 'cfg_distill')[:8]}"


@dataclass(frozen=True)
class StagePaths:
    """Where one stage of one run keeps its Ray Train checkpoints and its output."""

    run: str
    stage: str
    identity: str
    root: str  # s3://<bucket> or a local directory (benchmarks)

    @classmethod
    def of(cls, config: Config, stage: str, run: str | None = None, root: str | None = None,
           settings: S3Settings | None = None) -> "StagePaths":
        if root is None:
            root = (settings or S3Settings.from_config(config.storage)).uri().rstrip("/")
        return cls(run or default_run_name(config), stage, stage_identity(config, stage), root.rstrip("/"))

    @property
    def trainer_name(self) -> str:
        return f"{self.stage}-{self.identity}"

    @property
    def storage_path(self) -> str:
        """Ray Train's ``RunConfig.storage_path`` (the run's checkpoints live under trainer_name)."""
        return f"{self.root}/checkpoints/{self.run}"

    @property
    def output(self) -> str:
        return f"{self.root}/models/{self.run}/{self.trainer_name}"

    @property
    def manifest(self) -> str:
        return f"{self.output}/{MANIFEST}"


def read_stage_manifest(uri: str, settings: S3Settings | None = None) -> dict | None:
    """A stage output's manifest (``<output>/manifest.json`` or the manifest's own URI), or None."""
    return read_json(uri if uri.endswith(".json") else f"{uri.rstrip('/')}/{MANIFEST}", settings)


def local_dir(uri: str, settings: S3Settings | None = None) -> Path:
    """A local copy of an output directory (s3:// is copied once into the model cache)."""
    if is_s3_uri(uri):
        from icd.models.loading import download_s3_model

        return download_s3_model(uri, settings=settings)
    return Path(uri)


def upload_dir(local: Path, uri: str, settings: S3Settings | None = None) -> None:
    from pyarrow import fs as pafs

    fs, path = filesystem_for(uri, settings)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def write_json(uri: str, payload: dict, settings: S3Settings | None = None) -> None:
    fs, path = filesystem_for(uri, settings)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(payload, indent=1).encode())


# --- models ------------------------------------------------------------------------------

def load_stage_bundle(manifest: dict, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                      settings: S3Settings | None = None) -> ModelBundle:
    """The model a stage produced: the base components, its UNet, and its adapters (frozen, eval)."""
    from diffusers import UNet2DConditionModel

    from icd.models.adapters import load_adapter
    from icd.models.loading import load_bundle

    bundle = load_bundle(manifest["base"], revision=manifest.get("revision"), dtype=dtype, device=device,
                         vae=manifest.get("vae"))
    if manifest.get("unet"):
        unet_dir = local_dir(manifest["unet"], settings)
        bundle.unet = UNet2DConditionModel.from_pretrained(unet_dir, use_safetensors=True, torch_dtype=dtype)
        bundle.unet.to(device).eval().requires_grad_(False)
    for name, uri in (manifest.get("adapters") or {}).items():
        load_adapter(bundle.unet, name, local_dir(uri, settings))
    bundle.unet.requires_grad_(False)
    return bundle


@dataclass
class StageModel:
    """What a worker trains: the bundle, the objective over it, and which parameters are trainable."""

    stage: str
    bundle: ModelBundle
    objective: torch.nn.Module
    uncond: torch.Tensor
    target: EMATarget | None = None  # the EMA consistency target, when method.target_ema_decay is set
    extra: dict = field(default_factory=dict)

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in self.bundle.unet.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def encode_batch(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(clean latents, caption hidden states) from a latent-cache batch or a raw pixels + token batch."""
        device, dtype = self.bundle.device, self.bundle.dtype
        if "latents" in batch:
            return batch["latents"].to(device, dtype), batch["encoder_hidden_states"].to(device, dtype)
        from icd.data.preprocess import to_model_range

        latents = self.bundle.encode_images(to_model_range(batch["pixels"]).to(device))
        sizes = batch.get("size_ids")
        hidden = self.bundle.encode_token_ids(batch["input_ids"].to(device).long(),
                                              None if sizes is None else sizes.to(device))
        return latents, hidden.to(dtype)

    def export(self, directory: Path) -> None:
        """Write the stage's artifacts under ``directory`` in the layout `artifact_layout` names."""
        from icd.models.adapters import save_adapter

        layout = artifact_layout(self.stage)
        unet = self.bundle.unet
        if layout["unet"]:
            from icd.train.objectives import GUIDANCE_ADAPTER

            if GUIDANCE_ADAPTER in self.bundle.adapters:  # LoRA fine-tune: fold it into the weights
                unet = copy.deepcopy(unet)
                unet.fuse_lora(adapter_names=[GUIDANCE_ADAPTER])
                unet.unload_lora()
            unet.save_pretrained(directory / layout["unet"], safe_serialization=True)
        for name, relative in layout["adapters"].items():
            save_adapter(unet, name, directory / relative)


def artifact_layout(stage: str) -> dict:
    """Relative paths of a stage's artifacts: cfg_distill ships a UNet, the others two adapters."""
    if check_stage(stage) == "cfg_distill":
        return {"unet": "unet", "adapters": {}}
    return {"unet": None, "adapters": {name: f"adapters/{name}" for name in (FORWARD, REVERSE)}}


def build_stage_model(stage: str, config: Config, input_manifest: dict | None,
                      device: str | torch.device = "cpu", settings: S3Settings | None = None) -> StageModel:
    """The stage's model with exactly the intended parameters trainable."""
    from icd.losses.cycle import PatchLPIPS
    from icd.models.adapters import add_adapters, add_adapters_from_config
    from icd.models.guidance_unet import add_guidance_embedding
    from icd.models.loading import load_bundle
    from icd.train import objectives

    check_stage(stage)
    stage_config = getattr(config.train, stage)
    boundaries = Boundaries.from_config(config.method)
    target = None
    if stage == "cfg_distill":
        bundle = load_bundle(config.model.base, revision=config.model.revision, device=device, vae=config.model.vae)
        teacher = None
        if not stage_config.lora:
            teacher = copy.deepcopy(bundle.unet).requires_grad_(False)
        add_guidance_embedding(bundle.unet, config.model.guidance_embedding_dim)
        if stage_config.lora:
            add_adapters(bundle.unet, config.model.lora_rank, config.model.lora_alpha, list(config.model.lora_targets),
                         names=(objectives.GUIDANCE_ADAPTER,), init=config.model.lora_init)
            bundle.unet.time_embedding.cond_proj.requires_grad_(True)  # new, so always trained
        else:
            bundle.unet.requires_grad_(True)
        uncond = bundle.encode_prompts([""])
        objective = objectives.CFGDistillObjective(bundle, uncond, config.method.guidance_scales, teacher)
    else:
        if input_manifest is None:
            raise ValueError(f"stage {stage} needs the output of {PREVIOUS[stage]}")
        bundle = load_stage_bundle(input_manifest, device, settings=settings)
        uncond = bundle.encode_prompts([""])
        if stage == "icd":
            add_adapters_from_config(bundle.unet, config.model)
        else:
            for name, param in bundle.unet.named_parameters():  # the forward adapter only
                param.requires_grad_(f".{FORWARD}." in name and "lora_" in name)
        trained = (FORWARD, REVERSE) if stage == "icd" else (FORWARD,)
        if config.method.target_ema_decay:
            target = EMATarget(bundle.unet, trained, config.method.target_ema_decay)
        if stage == "icd":
            objective = objectives.ICDObjective(bundle, boundaries, config.method, target and target.names)
        else:
            lpips = PatchLPIPS(pretrained_backbone=config.method.lpips_pretrained_backbone).to(device)
            objective = objectives.CycleObjective(bundle, boundaries, config.method, lpips, target and target.names)
    bundle.unet.train()
    if config.model.gradient_checkpointing and torch.device(device).type == "cuda":
        bundle.unet.enable_gradient_checkpointing()
        decoder = getattr(objective, "decoder", None)  # cycle's fused reverse copy: backward runs through it
        if decoder is not None:
            decoder.unet.enable_gradient_checkpointing()
    return StageModel(stage, bundle, objective, uncond, target)


def make_manifest(paths: StagePaths, config: Config, input_manifest: dict | None, steps: int,
                  resumed_from: list[int]) -> dict:
    """The manifest of a finished stage; artifact paths become URIs under the stage's output."""
    previous, exported = input_manifest or {}, artifact_layout(paths.stage)
    unet = f"{paths.output}/{exported['unet']}" if exported.get("unet") else previous.get("unet")
    return {
        "stage": paths.stage, "identity": paths.identity, "run": paths.run, "config_hash": config.hash(),
        "base": config.model.base, "revision": config.model.revision, "vae": config.model.vae, "unet": unet,
        "adapters": {name: f"{paths.output}/{rel}" for name, rel in exported.get("adapters", {}).items()},
        "boundaries": {"reverse": list(config.method.reverse_timesteps),
                       "forward": list(config.method.forward_timesteps)},
        "input": previous.get("output"), "output": paths.output, "steps": steps, "resumed_from": resumed_from,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def export_untrained(config: Config, run: str, root: str, settings: S3Settings | None = None) -> dict:
    """Export cfg_distill -> icd as built, without training (zero-init LoRA on the base): the manifest.

    A real model with the trained one's shapes and cost, for serving tests and load benchmarks.
    """
    manifest = None
    for stage in ("cfg_distill", "icd"):
        paths = StagePaths.of(config, stage, run, root, settings)
        export_stage(build_stage_model(stage, config, manifest), paths.output, settings)
        manifest = make_manifest(paths, config, manifest, 0, [])
        write_json(paths.manifest, manifest, settings)
    return manifest


def export_stage(model: StageModel, output_uri: str, settings: S3Settings | None = None) -> None:
    """Export the artifacts into the stage's output directory (local or s3://)."""
    with tempfile.TemporaryDirectory(prefix="icd-export-") as tmp:
        model.export(Path(tmp))
        upload_dir(Path(tmp), output_uri, settings)


def latest_stage_manifest(root: str, run: str, stage: str, settings: S3Settings | None = None) -> dict | None:
    """The most recently finished output of ``stage`` in ``run`` (any identity), or None."""
    from pyarrow import fs as pafs

    fs, path = filesystem_for(f"{root.rstrip('/')}/models/{run}", settings)
    try:
        entries = fs.get_file_info(pafs.FileSelector(path))
    except FileNotFoundError:
        return None
    manifests = [read_stage_manifest(f"{root.rstrip('/')}/models/{run}/{e.base_name}", settings)
                 for e in entries if e.type == pafs.FileType.Directory and e.base_name.startswith(f"{stage}-")]
    manifests = [m for m in manifests if m is not None]
    return max(manifests, key=lambda m: m["finished_at"]) if manifests else None
