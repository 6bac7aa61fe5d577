"""Typed run configuration: YAML presets plus ``--set a.b=c`` overrides.

Every job reads one `Config`. A preset (``jobs/configs/toy.yaml``, ``sd15.yaml``) names
every value that differs from the defaults below; the defaults are the method's numbers
from DESIGN.md (SD1.5 production). Unknown keys are errors, so a typo never silently
falls back to a default.

Guidance notation, used everywhere in this package: ``eps_w = eps(c) + w * (eps(c) - eps(0))``.
``w = 0`` is unguided, code ``w = 7`` is classical CFG 8, code ``w = 19`` is classical 20.

Credentials are never part of a config: they come from the environment (see
``icd.storage``), so a resolved config can be logged to MLflow as it is.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the field."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """Which base model to distil and how the LoRA adapters are shaped."""

    # "toy" = the project's own tiny shapes-world model; otherwise a hub id
    # ("stable-diffusion-v1-5/stable-diffusion-v1-5"), a local directory or an s3:// URI,
    # always in diffusers layout with safetensors weights.
    base: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    revision: str | None = None
    # Another VAE than the base's (hub id, directory or s3:// URI): SDXL's VAE overflows in fp16, so in
    # fp16 it is kept in fp32 unless this names one fixed for it (madebyollin/sdxl-vae-fp16-fix).
    vae: str | None = None
    resolution: int = Field(512, ge=8, description="training/serving image side in pixels")
    lora_rank: int = Field(64, ge=1)
    lora_alpha: float = Field(8.0, gt=0, description="PEFT's default alpha, scale alpha/rank")
    lora_targets: list[str] = Field(
        default_factory=lambda: [
            "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out",
            "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "conv_shortcut", "time_emb_proj",
        ],
        min_length=1,
    )
    # PEFT's init_lora_weights: "default" (A Kaiming-uniform, B zero; the official iCD code's)
    # or "gaussian" (A ~ N(0, 1/r), B zero). Both start as the identity; A's scale sets how fast B moves.
    lora_init: Literal["default", "gaussian"] = "default"
    guidance_embedding_dim: int = Field(512, ge=1, description="UNet time_cond_proj_dim")
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False


class DataConfig(_Section):
    """Where the LAION-format shards live and which samples are kept."""

    dataset: str = "laion-aesthetic-6.5"  # s3://<bucket>/datasets/<dataset>/ unless shards_uri
    shards_uri: str | None = None
    eval_dataset: str | None = None
    # Held-out images that choose the checkpoint a stage exports (`train.<stage>.export: best_validation`):
    # a split of their own, so that the evaluation set (`eval_dataset`) never takes part in a choice.
    validation_dataset: str | None = None
    min_side: int = Field(256, ge=1)
    max_aspect_ratio: float = Field(2.0, ge=1.0)
    min_similarity: float | None = Field(None, ge=0, le=1)
    max_pwatermark: float | None = Field(None, ge=0, le=1)
    crop: Literal["center", "random"] = "random"
    use_latent_cache: bool = True
    shuffle_seed: int = 0
    # Ray Data hands the training blocks out in read order, so a rerun of a stage sees the same batches
    # (icd.data.feeding.ingest_config); off, the order follows the read tasks' timing.
    preserve_order: bool = False


class MethodConfig(_Section):
    """The iCD method's numbers (DESIGN.md, "The method in one page")."""

    num_train_timesteps: int = Field(1000, ge=2)
    beta_start: float = Field(0.00085, gt=0)
    beta_end: float = Field(0.012, gt=0)
    guidance_scales: list[float] = Field(default_factory=lambda: [0.0, 7.0, 11.0, 15.0, 19.0], min_length=1)
    # The codes w the reverse consistency loss draws its guided teacher targets at; None: guidance_scales
    # (the paper's). cfg_distill always learns guidance_scales, so a decoder trained on fewer codes
    # still decodes guided through the w-embedding. Repeat a value to weight it ([0, 0, 0, 0, 7]).
    reverse_guidance_scales: list[float] | None = Field(None, min_length=1)
    # Segment starts of the reverse (decoder) and forward (encoder) models; a step from t
    # lands on the neighbouring boundary.
    reverse_timesteps: list[int] = Field(default_factory=lambda: [999, 779, 519, 259], min_length=1)
    forward_timesteps: list[int] = Field(default_factory=lambda: [19, 259, 519, 779], min_length=1)
    teacher_step: int = Field(20, ge=1, description="teacher DDIM jump on the 50-step grid")
    huber_c: float = Field(0.001, gt=0)
    # Where the consistency distance is measured: "latent" (the official code: on the jumped latents) or
    # "eps" (the latents divided by the jump's gain on epsilon, sigma_s - alpha_s sigma_t / alpha_t, so
    # that every segment counts in epsilon units; the decoder's first segment has ~3x the gain of its last).
    consistency_space: Literal["latent", "eps"] = "latent"
    target_ema_decay: float = Field(0.0, ge=0, lt=1, description="consistency target: 0 = the online student "
                                    "without grad; mu = an EMA copy, theta- <- mu theta- + (1 - mu) theta")
    lambda_forward: float = Field(1.5, ge=0)
    lambda_reverse: float = Field(1.5, ge=0)
    # The preservation losses on the segment ending at the clean latent: "jump" is the official
    # iCD code's form (the decoder jumps to the encoder's first timestep with its own epsilon;
    # Lr targets x_19), "renoise" this project's first form (the clean latent re-noised to 19
    # with fresh noise; Lr targets the clean latent). See icd.train.objectives.CLEAN_END_MODES.
    preservation_clean_end: Literal["jump", "renoise"] = "jump"
    dynamic_cfg_tau: float = Field(0.8, ge=0, le=1)
    encode_from_timestep: int = Field(19, ge=0)
    # LPIPS for the cycle loss: ImageNet VGG in production; a random VGG where torchvision's
    # weights cannot be downloaded (the metric is then named lpips_randvgg).
    lpips_pretrained_backbone: bool = True

    @field_validator("reverse_timesteps")
    @classmethod
    def _reverse_descending(cls, v: list[int]) -> list[int]:
        if any(a <= b for a, b in zip(v, v[1:])):
            raise ValueError("expected strictly decreasing timesteps, e.g. [999, 779, 519, 259]")
        return v

    @field_validator("forward_timesteps")
    @classmethod
    def _forward_ascending(cls, v: list[int]) -> list[int]:
        if any(a >= b for a, b in zip(v, v[1:])):
            raise ValueError("expected strictly increasing timesteps, e.g. [19, 259, 519, 779]")
        return v

    @model_validator(mode="after")
    def _timesteps_in_range(self) -> "MethodConfig":
        top = self.num_train_timesteps - 1
        for name in ("reverse_timesteps", "forward_timesteps"):
            bad = [t for t in getattr(self, name) if not 0 <= t <= top]
            if bad:
                raise ValueError(f"{name}: expected timesteps in [0, {top}], got {bad}")
        if self.beta_end <= self.beta_start:
            raise ValueError(f"beta_end must exceed beta_start ({self.beta_start}), got {self.beta_end}")
        return self


class EditingConfig(_Section):
    """Defaults of an edit (a request may override them)."""

    mode: Literal["switch", "p2p", "guided"] = "switch"
    guidance: float = Field(7.0, ge=0, description="code w of the target decode (classical CFG w + 1)")
    tau: float = Field(0.8, ge=0, le=1, description="dynamic CFG: unguided while t/1000 > tau")
    p2p_cross_fraction: float = Field(0.3, ge=0, le=1)
    p2p_self_fraction: float = Field(0.6, ge=0, le=1)
    guided_feature_weights: list[float] = Field(default_factory=lambda: [0.5, 0.5, 0.5, 0.5])
    guided_self_attention_weights: list[float] = Field(default_factory=lambda: [0.0, 20000.0, 20000.0, 20000.0])
    guided_bounds: tuple[float, float] = (0.0, 1.0)


class ServingConfig(_Section):
    """How a served model runs (the registry model and the Serve replicas); no effect on training."""

    fuse_adapters: bool = Field(True, description="one UNet per direction with its LoRA merged in: an edit runs "
                                "plain UNet passes (false: the training form, adapters switched per call)")
    prompt_cache_size: int = Field(256, ge=0, description="prompt embeddings kept per replica, least recently "
                                   "used dropped first (0: encode every prompt)")
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = Field(
        "off", description="torch.compile mode of the served UNets, warmed up when the model loads (for GPUs)")


class StageConfig(_Section):
    """Optimisation settings of one training stage."""

    steps: int = Field(6000, ge=0)
    lr: float = Field(8e-6, gt=0)
    # diffusers' schedules (`diffusers.optimization.get_scheduler`), as in its training scripts.
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    lr_warmup_steps: int = Field(0, ge=0, description="linear ramp from 0 to lr over this many steps")
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    # One optimizer step per loss term in turn (icd: reverse CD, forward CD, Lf, Lr), each clipped
    # over the adapter it trains, as the official iCD training does; false: one step on their sum.
    step_per_term: bool = False
    global_batch_size: int = Field(512, ge=1)
    lora: bool = True
    log_every: int = Field(10, ge=1)
    images_every: int = Field(500, ge=1)
    checkpoint_every: int = Field(500, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    # Which weights the stage exports: those of its last step, or those of the checkpoint whose
    # reconstruction PSNR on `data.validation_dataset` is highest (early stopping's "restore the best
    # weights"; Ray Train keeps that checkpoint through `checkpoint_score_attribute`). icd and cycle only.
    export: Literal["last", "best_validation"] = "last"
    validation_count: int = Field(64, ge=1, description="images of data.validation_dataset scored at each "
                                  "checkpoint when export is best_validation")

    @model_validator(mode="after")
    def _warmup_has_a_schedule(self) -> "StageConfig":
        if self.lr_warmup_steps and self.lr_scheduler == "constant":
            raise ValueError(f"lr_warmup_steps={self.lr_warmup_steps} is ignored by lr_scheduler 'constant': "
                             f"expected lr_scheduler 'constant_with_warmup', 'linear' or 'cosine', or no warmup")
        if self.lr_warmup_steps > self.steps:
            raise ValueError(f"lr_warmup_steps={self.lr_warmup_steps}: expected at most steps={self.steps}")
        return self


class TrainConfig(_Section):
    cfg_distill: StageConfig = Field(default_factory=StageConfig)
    icd: StageConfig = Field(default_factory=StageConfig)
    cycle: StageConfig = Field(default_factory=StageConfig)


class ScalingConfig(_Section):
    """Mirrors Ray Train's ``ScalingConfig``."""

    num_workers: int = Field(1, ge=1)
    use_gpu: bool = True
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, ge=0)
    # Custom Ray resources each worker also needs, e.g. {icd_worker_node: 1}: one worker per node that
    # advertises one (icd.stack.nodes), or workers only on a labelled node pool.
    custom_resources_per_worker: dict[str, float] = Field(default_factory=dict)
    # How long a stage waits for its workers' resources to be free before it fails naming who
    # holds them (icd.train.resources); 0 skips the check. Long on clusters that add nodes.
    resources_timeout_s: float = Field(600.0, ge=0)


class StorageConfig(_Section):
    """Object storage. Endpoint and credentials default to the environment (AWS_*)."""

    bucket: str | None = Field(None, description="defaults to $ICD_BUCKET")
    endpoint_url: str | None = Field(None, description="defaults to $AWS_ENDPOINT_URL")


class Gate(_Section):
    """A promotion rule on one evaluation metric (e.g. ``cycle.psnr``)."""

    metric: str
    higher_is_better: bool = True
    threshold: float | None = Field(None, description="the candidate must reach this value at least (or at most)")
    max_regression: float | None = Field(0.0, ge=0, description="allowed loss against the champion; None: no comparison")


# What each stage's no-regression check measures (icd.evaluation.regression).
STAGE_METRICS = {"cfg_distill": ("eps_mse", "caption_accuracy"), "icd": ("psnr", "caption_accuracy"),
                 "cycle": ("psnr",)}


class StageGate(_Section):
    """A no-regression rule: ``stage``'s output must not be worse than its input on ``metric``.

    Metrics per stage (icd.evaluation.regression.STAGE_METRICS): cfg_distill: eps_mse (lower is
    better), caption_accuracy; icd: psnr, caption_accuracy; cycle: psnr.
    """

    stage: Literal["cfg_distill", "icd", "cycle"]
    metric: Literal["psnr", "caption_accuracy", "eps_mse"]
    max_regression: float = Field(0.0, ge=0, description="allowed loss against the stage's input (dB, fraction "
                                  "or MSE, in the metric's unit)")
    # A fraction measured on a few dozen images moves by several images between two equally good
    # models; a loss within this many standard errors of the paired difference is measurement noise.
    noise_sigmas: float = Field(2.0, ge=0, description="for fractions (caption_accuracy): standard errors of the "
                                "paired before/after difference also allowed")

    @model_validator(mode="after")
    def _metric_of_stage(self) -> "StageGate":
        measured = STAGE_METRICS[self.stage]
        if self.metric not in measured:
            raise ValueError(f"stage {self.stage} measures {', '.join(measured)}, not {self.metric}")
        return self


class TrackingConfig(_Section):
    experiment: str = "icd"
    tracking_uri: str | None = Field(None, description="defaults to $MLFLOW_TRACKING_URI")
    registered_model: str | None = Field(None, description="defaults to icd-<preset>")
    # A candidate becomes `champion` only when it passes every gate; otherwise `challenger`.
    gates: list[Gate] = Field(default_factory=lambda: [
        Gate(metric="psnr", max_regression=0.5),
        Gate(metric="edit_success", max_regression=0.05),
    ])
    # The DAG refuses to go on (and to register) when a stage's output is worse than its input.
    # (caption_accuracy is measured on shapes-world captions only: the toy preset gates on it too)
    stage_gates: list[StageGate] = Field(default_factory=lambda: [
        StageGate(stage="cfg_distill", metric="eps_mse"),
        StageGate(stage="icd", metric="psnr"),
        StageGate(stage="cycle", metric="psnr"),
    ])
    stage_check_count: int = Field(64, ge=1, description="held-out images of each stage's no-regression check")

    def model_name(self, preset: str) -> str:
        return self.registered_model or f"icd-{preset}"


class Config(_Section):
    preset: str = "sd15"
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    editing: EditingConfig = Field(default_factory=EditingConfig)
    serving: ServingConfig = Field(default_factory=ServingConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _best_validation_has_images(self) -> "Config":
        for stage in ("cfg_distill", "icd", "cycle"):
            if getattr(self.train, stage).export != "best_validation":
                continue
            if stage == "cfg_distill":
                raise ValueError("train.cfg_distill.export: best_validation scores reconstruction, which the "
                                 "guidance-distilled UNet alone does not do; expected 'last' (best_validation "
                                 "is for icd and cycle)")
            if not self.data.validation_dataset:
                raise ValueError(f"train.{stage}.export is best_validation but data.validation_dataset is not "
                                 f"set: expected the name of a held-out shard dataset (e.g. shapes-val, written "
                                 f"by jobs/make_shards.py --val-count)")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def hash(self) -> str:
        """Stable identity of the resolved config (sha256 of canonical JSON, 16 hex chars)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b.c=value`` to a nested dict in place; the value is parsed as YAML."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. train.icd.lr=1e-4")
    parts = key.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"--set {assignment!r}: empty component in key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({exc.problem})") from None
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            raise ConfigError(f"--set {key}: '{where}' is a value ({child!r}), not a section")
        node = child
    node[parts[-1]] = value


def _describe(error: dict[str, Any], source: str, model: type[BaseModel]) -> str:
    loc = ".".join(str(p) for p in error["loc"]) or "<root>"
    if error["type"] == "extra_forbidden":
        parent = _section_at(model, error["loc"][:-1])
        known = ", ".join(parent.model_fields) if parent else "see the preset files"
        return f"{source}: unknown field '{loc}'; expected one of: {known}"
    msg = error["msg"].removeprefix("Value error, ")
    got = error.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{source}: field '{loc}': {msg}{shown}"


def _section_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def build_config(tree: dict[str, Any], source: str = "config") -> Config:
    """Validate a nested dict into a `Config`, turning pydantic errors into a `ConfigError`."""
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        lines = [_describe(e, source, Config) for e in exc.errors()]
        raise ConfigError("\n".join(lines)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML preset (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist (presets live in jobs/configs/)") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(loaded).__name__}")
        tree = loaded
    for assignment in overrides:
        apply_override(tree, assignment)
    if overrides:
        source += " + --set"
    return build_config(tree, source)
