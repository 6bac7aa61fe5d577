"""The Ray Serve application: a FastAPI ingress and a batched, autoscaled editor deployment.

    serve deploy serve/config.yaml            # or: icd serve up (the local stack)

``Editor`` holds the model (``models:/icd-<preset>@champion`` from the MLflow registry, or a
stage output's manifest) and batches invert / edit / reconstruct / generate requests with
``@serve.batch``: requests with different prompts, guidance scales and seeds share one UNet
pass per step. ``reconfigure`` (a new ``user_config``, e.g. after the alias moved) loads the
new model beside the old one and swaps them; requests in flight finish on the model they
started with. ``Gateway`` is the HTTP API (OpenAPI at /docs) and the web page at /.
"""


import base64
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field, field_validator
from ray import serve
from ray.serve.exceptions import BackPressureError

PAGE = Path(__file__).with_name("page.html")
MAX_PIXELS = int(os.environ.get("ICD_SERVE_MAX_PIXELS", 4096 * 4096))
MAX_PROMPT_CHARS = 500
# Batch queue defaults; user_config max_batch_size / batch_wait_timeout_s change them per deployment.
# No wait by default: under load the requests that arrive during a batch form the next one anyway,
# and at low load a 20 ms wait cost ~100 ms per call here (measured through a handle on the toy preset).
MAX_BATCH_SIZE, BATCH_WAIT_S = 8, 0.0


# --- the model deployment ----------------------------------------------------------------------

@dataclass
class LoadedModel:
    pipeline: object  # icd.editing.pipeline.EditPipeline
    name: str
    version: str
    source: str


def resolve(model_uri: str, pinned: str | None = None) -> tuple[str, str]:
    """(name, version) that ``model_uri`` names right now, or at the ``pinned`` registry version."""
    if model_uri.startswith("models:/"):
        import mlflow

        name, _, ref = model_uri.removeprefix("models:/").partition("@")
        name, _, version = name.partition("/")
        if pinned:
            return name, str(pinned)
        if ref:
            return name, str(mlflow.MlflowClient().get_model_version_by_alias(name, ref).version)
        return name, version
    from icd.train.stages import read_stage_manifest

    manifest = read_stage_manifest(model_uri)
    if manifest is None:
        raise ValueError(f"model_uri {model_uri!r}: expected models:/<name>@<alias> or a stage output with manifest.json")
    return manifest["stage"], manifest["identity"]


def load_model(model_uri: str, version: str | None = None) -> LoadedModel:
    """``models:/<name>@<alias>`` or ``models:/<name>/<version>`` through MLflow, or a stage manifest URI.

    ``version`` pins the registry version an alias was resolved to by whoever deployed the config.
    """
    name, version = resolve(model_uri, version)
    if model_uri.startswith("models:/"):
        import mlflow

        model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
        return LoadedModel(model.unwrap_python_model().pipeline, name, version, model_uri)
    from icd.config import load_config
    from icd.editing.pipeline import EditPipeline, inference_placement
    from icd.train.stages import read_stage_manifest

    manifest = read_stage_manifest(model_uri)
    config = load_config(os.environ.get("ICD_SERVE_CONFIG", "jobs/configs/toy.yaml"))
    device, dtype = inference_placement(config.model.mixed_precision)
    pipeline = EditPipeline.from_manifest(manifest, config.editing, config.model.resolution, device=device,
                                          dtype=dtype, serving=config.serving)
    return LoadedModel(pipeline, manifest["stage"], manifest["identity"], model_uri)


@dataclass
class Job:
    kind: str  # "invert", "decode", or an edit mode
    image: object = None  # PIL image (invert)
    latents: object = None  # (1, C, h, w) tensor (decode)
    prompt: str = ""  # the source prompt of an edit
    target: str = ""
    guidance: float = 0.0
    tau: float | None = None
    seed: int = 0
    model: LoadedModel | None = None


@serve.deployment(max_ongoing_requests=16, ray_actor_options={"num_cpus": 1},
                  autoscaling_config={"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 8})
class Editor:
    """The batched model; GPU replicas in production (num_gpus: 1), CPU on the toy preset.

    ``max_ongoing_requests`` (16) is at least the batch size (8), so a replica can fill a batch.
    """

    def __init__(self, model_uri: str | None = None):
        self.model: LoadedModel | None = None
        self.calls = 0  # batched model calls, for tests and metrics
        self.max_batch_size = MAX_BATCH_SIZE
        if model_uri:
            self.model = load_model(model_uri)

    def reconfigure(self, user_config: dict) -> None:
        """Serve ``user_config.model_uri`` (at ``model_version`` when given; else what the alias names now).

        A no-op when that is the model served. The new model is built before the swap; requests in
        flight keep their reference to the old one and finish on it.
        """
        self._set_batching(user_config)
        uri = user_config.get("model_uri") or (self.model.source if self.model else None)
        if not uri:
            return
        pinned = user_config.get("model_version")
        if self.model is None or resolve(uri, pinned) != (self.model.name, self.model.version):
            self.model = load_model(uri, pinned)

    def _set_batching(self, user_config: dict) -> None:
        """``user_config.max_batch_size`` / ``batch_wait_timeout_s``: the knobs of every batch queue."""
        size, wait = user_config.get("max_batch_size"), user_config.get("batch_wait_timeout_s")
        if size is not None and (not isinstance(size, int) or size < 1):
            raise ValueError(f"user_config.max_batch_size: expected an integer >= 1, got {size!r}")
        if wait is not None and (not isinstance(wait, (int, float)) or wait < 0):
            raise ValueError(f"user_config.batch_wait_timeout_s: expected seconds >= 0, got {wait!r}")
        for queue in (self.invert, self.decode, self.edits):
            if size is not None:
                queue.set_max_batch_size(size)
            if wait is not None:
                queue.set_batch_wait_timeout_s(float(wait))
        if size is not None:
            self.max_batch_size = size

    def info(self) -> dict:
        if self.model is None:
            return {"loaded": False}
        from icd.models.fused import FusedBundle

        pipeline = self.model.pipeline
        unet = pipeline.bundle.unet.config
        return {"loaded": True, "name": self.model.name, "version": self.model.version, "source": self.model.source,
                "resolution": pipeline.resolution, "steps": len(pipeline.boundaries.reverse_timesteps),
                "latent_size": unet.sample_size, "latent_channels": unet.in_channels, "calls": self.calls,
                "max_batch_size": self.max_batch_size, "fused": isinstance(pipeline.bundle, FusedBundle),
                "weights_bytes": pipeline.memory()}

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_S)
    async def invert(self, jobs: list[Job]) -> list[tuple]:
        from icd.editing.pipeline import invert_batch

        def run(model, group):
            out = invert_batch(model.pipeline, [j.image for j in group], [j.prompt for j in group],
                               [j.seed for j in group])
            return [(out.latents[i:i + 1].cpu(), out.nfe) for i in range(len(group))]
        return self._by_model(jobs, run)

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_S)
    async def decode(self, jobs: list[Job]) -> list[tuple]:
        import torch

        from icd.editing.pipeline import decode_batch

        def run(model, group):
            out = decode_batch(model.pipeline, torch.cat([j.latents for j in group]), [j.prompt for j in group],
                               [j.guidance for j in group], [j.tau for j in group])
            return [(out.images[i:i + 1].cpu(), out.nfe) for i in range(len(group))]
        return self._by_model(jobs, run)

    def _by_model(self, jobs: list[Job], run) -> list:
        """Run each model's jobs as one batch (a swap can leave two models in one batch)."""
        results: list = [None] * len(jobs)
        groups: dict[int, list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(id(job.model), []).append(i)
        for indices in groups.values():
            self.calls += 1
            for i, result in zip(indices, run(jobs[indices[0]].model, [jobs[i] for i in indices])):
                results[i] = result
        return results

    def current(self) -> LoadedModel:
        if self.model is None:
            raise RuntimeError("no model loaded: set user_config.model_uri")
        return self.model

    async def run_invert(self, image, prompt: str, seed: int) -> tuple:
        model = self.current()
        latents, nfe = await self.invert(Job("invert", image=image, prompt=prompt, seed=seed, model=model))
        return latents, nfe, model.version

    async def run_decode(self, latents, prompt: str, guidance: float, tau, version: str | None = None) -> tuple:
        model = self.current()
        images, nfe = await self.decode(Job("decode", latents=latents, prompt=prompt, guidance=guidance, tau=tau,
                                            model=model))
        return images, nfe, model.version

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_S)
    async def edits(self, jobs: list[Job]) -> list[tuple]:
        """Edits of images in one call: inversion and decoding without a second queue or hop.

        ``switch`` edits share one batch whatever their w, tau and seed (per-sample guidance);
        ``p2p`` / ``guided`` edits share one when their mode, w, tau and seed match.
        """
        from icd.editing.pipeline import decode_batch, invert_batch, to_pictures

        results: list = [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            key = (id(job.model), "switch") if job.kind == "switch" else \
                (id(job.model), job.kind, job.guidance, job.tau, job.seed)
            groups.setdefault(key, []).append(i)
        for key, indices in groups.items():
            self.calls += 1
            group = [jobs[i] for i in indices]
            pipeline = group[0].model.pipeline
            if key[1] == "switch":
                inverted = invert_batch(pipeline, [j.image for j in group], [j.prompt for j in group],
                                        [j.seed for j in group])
                out = decode_batch(pipeline, inverted.latents, [j.target for j in group], [j.guidance for j in group],
                                   [j.tau for j in group])
                pictures, nfe = to_pictures(out.images, [j.image.size for j in group]), inverted.nfe + out.nfe
            else:
                out = pipeline.edit([j.image for j in group], [j.prompt for j in group], [j.target for j in group],
                                    guidance=key[2], tau=key[3], mode=key[1], seed=key[4])
                pictures, nfe = out.images, out.nfe
            for i, picture in zip(indices, pictures):
                results[i] = (picture, nfe)
        return results

    async def run_edit(self, image, source: str, target: str, guidance: float, tau, seed: int, mode: str) -> tuple:
        """One edit of an image -> (picture at the image's size, NFE, model version)."""
        model = self.current()
        picture, nfe = await self.edits(Job(mode, image=image, prompt=source, target=target, guidance=guidance,
                                            tau=tau, seed=seed, model=model))
        return picture, nfe, model.version


# --- the HTTP API ------------------------------------------------------------------------------

api = FastAPI(title="icd editor", version="1",
              description="Invertible consistency-distilled image editing: 4 forward + 4 reverse UNet passes.")


class ApiError(Exception):
    def __init__(self, status: int, field: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.field, self.message, self.headers = status, field, message, headers or {}


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse({"error": exc.message, "field": exc.field}, status_code=exc.status, headers=exc.headers)


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    import logging

    logging.getLogger("ray.serve").exception("request failed")
    return JSONResponse({"error": f"{type(exc).__name__}: {str(exc)[:500]}", "field": "server"}, status_code=500)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first["loc"] if p != "body") or "body"
    return JSONResponse({"error": first["msg"], "field": field}, status_code=422)


def _prompt(value: str, field: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError(f"{field} must not be empty")
    if len(value) > MAX_PROMPT_CHARS:
        raise ValueError(f"{field} is longer than {MAX_PROMPT_CHARS} characters")
    return value


class Options(BaseModel):
    guidance: float = Field(7.0, ge=0, le=30, description="code w of the target decode (classical CFG w + 1)")
    tau: float | None = Field(0.8, ge=0, le=1, description="dynamic CFG: unguided while t/1000 > tau")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    steps: int | None = Field(None, description="decoder steps; must equal the model's trained steps")


class EditBody(Options):
    image: str | None = Field(None, description="base64 PNG/JPEG; or give latent_id from /v1/invert")
    latent_id: str | None = None
    source_prompt: str = ""
    target_prompt: str
    mode: str = Field("switch", pattern="^(switch|p2p|guided)$")

    @field_validator("target_prompt")
    @classmethod
    def _target(cls, v: str) -> str:
        return _prompt(v, "target_prompt")


class InvertBody(BaseModel):
    image: str
    prompt: str
    seed: int = Field(0, ge=0, le=2**31 - 1)

    @field_validator("prompt")
    @classmethod
    def _p(cls, v: str) -> str:
        return _prompt(v, "prompt")


class ReconstructBody(InvertBody):
    pass


class GenerateBody(Options):
    prompt: str
    width: int = Field(0, ge=0, le=4096, description="0: the model's resolution")
    height: int = Field(0, ge=0, le=4096)

    @field_validator("prompt")
    @classmethod
    def _p(cls, v: str) -> str:
        return _prompt(v, "prompt")


def decode_image(data: str, field: str = "image"):
    from PIL import Image

    try:
        raw = base64.b64decode(data, validate=True)
    except (ValueError, TypeError):
        raise ApiError(400, field, "not base64 text") from None
    try:
        image = Image.open(io.BytesIO(raw))
        width, height = image.size
        if width * height > MAX_PIXELS:
            raise ApiError(413, field, f"{width}x{height} is over the {MAX_PIXELS}-pixel cap")
        image.load()
    except ApiError:
        raise
    except Exception:
        raise ApiError(400, field, "the bytes are not a readable image (PNG, JPEG, WebP)") from None
    if min(image.size) < 1:
        raise ApiError(400, field, "empty image")
    return image.convert("RGB")


def to_png(images, size: tuple[int, int]) -> str:
    """The first image of a (B, 3, h, w) batch in [-1, 1] as base64 PNG at ``size``."""
    from icd.editing.pipeline import to_pictures

    return png_of(to_pictures(images, [size])[0])


def png_of(picture) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


class LatentStore:
    """Inverted latents in object storage, addressed by the sha256 of their safetensors bytes."""

    def __init__(self, prefix: str | None = None):
        from icd.storage import S3Settings

        self.settings = S3Settings.from_env()
        self.prefix = prefix or self.settings.uri("serve/latents")

    def put(self, latents, meta: dict) -> str:
        from safetensors.torch import save

        blob = save({"latents": latents.contiguous()}, metadata={k: str(v) for k, v in meta.items()})
        digest = hashlib.sha256(blob).hexdigest()
        from icd.storage import filesystem_for

        fs, path = filesystem_for(f"{self.prefix}/{digest}.safetensors", self.settings)
        with fs.open_output_stream(path) as f:
            f.write(blob)
        return digest

    def get(self, digest: str) -> tuple:
        from safetensors import safe_open
        from safetensors.torch import load

        from icd.storage import filesystem_for

        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ApiError(422, "latent_id", "expected the 64-hex-digit id returned by /v1/invert")
        fs, path = filesystem_for(f"{self.prefix}/{digest}.safetensors", self.settings)
        try:
            with fs.open_input_stream(path) as f:
                blob = f.read()
        except (FileNotFoundError, OSError):
            raise ApiError(404, "latent_id", f"unknown latent id {digest}") from None
        import tempfile

        with tempfile.NamedTemporaryFile(suffix=".safetensors") as tmp:
            tmp.write(blob)
            tmp.flush()
            with safe_open(tmp.name, "pt") as handle:
                meta = handle.metadata() or {}
        return load(blob)["latents"], meta


def _checked_source(prompt: str) -> str:
    try:
        return _prompt(prompt, "source_prompt")
    except ValueError as exc:
        raise ApiError(422, "source_prompt", str(exc)) from None


@serve.deployment(max_ongoing_requests=32, max_queued_requests=64, backpressure_config={"retry_after_s": 1},
                  ray_actor_options={"num_cpus": 0.25})
@serve.ingress(api)
class Gateway:
    def __init__(self, editor, api_key_env: str = "ICD_SERVE_API_KEY"):
        self.editor = editor
        self.api_key = os.environ.get(api_key_env) or None
        self.latents = LatentStore()

    def _check_key(self, key: str | None) -> None:
        if self.api_key and key != self.api_key:
            raise ApiError(401, "x-api-key", "missing or wrong API key (header X-API-Key)")

    async def _call(self, method: str, *args):
        try:
            return await getattr(self.editor, method).remote(*args)
        except BackPressureError:
            raise ApiError(503, "server", "busy: the request queue is full, retry shortly", {"Retry-After": "1"}) from None

    async def _model(self) -> dict:
        return await self.editor.info.remote()

    def _check_steps(self, steps: int | None, info: dict) -> None:
        if steps is not None and steps != info.get("steps", 4):
            raise ApiError(422, "steps", f"this model decodes in {info.get('steps', 4)} steps; got {steps}")

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> str:
        return PAGE.read_text()

    @api.get("/healthz")
    async def healthz(self) -> dict:
        info = await self._model()
        if not info.get("loaded"):
            raise ApiError(503, "model", "no model loaded yet")
        return {"status": "ok", "model": info["name"], "version": info["version"]}

    @api.get("/v1/models")
    async def models(self) -> dict:
        return await self._model()

    @api.post("/v1/invert")
    async def invert(self, body: InvertBody, x_api_key: str | None = Header(None)) -> dict:
        self._check_key(x_api_key)
        image = decode_image(body.image)
        latents, nfe, version = await self._call("run_invert", image, body.prompt, body.seed)
        latent_id = self.latents.put(latents, {"version": version, "width": image.width, "height": image.height,
                                               "prompt": body.prompt})
        return {"latent_id": latent_id, "nfe": nfe, "model_version": version}

    @api.post("/v1/edit")
    async def edit(self, body: EditBody, x_api_key: str | None = Header(None)) -> dict:
        self._check_key(x_api_key)
        if body.steps is not None:
            self._check_steps(body.steps, await self._model())
        if (body.image is None) == (body.latent_id is None):
            raise ApiError(422, "image", "give exactly one of image or latent_id")
        if body.image is not None:  # one call: invert + decode in the Editor's edit batch
            image = decode_image(body.image)
            picture, nfe, version = await self._call("run_edit", image, _checked_source(body.source_prompt),
                                                     body.target_prompt, body.guidance, body.tau, body.seed,
                                                     body.mode)
            return {"image": png_of(picture), "nfe": nfe, "model_version": version, "mode": body.mode}
        if body.mode != "switch":
            raise ApiError(422, "mode", f"mode {body.mode} needs the image (it re-inverts with attention control)")
        latents, meta = self.latents.get(body.latent_id)
        info = await self._model()
        if meta.get("version") != info.get("version"):
            raise ApiError(409, "latent_id", f"made by model version {meta.get('version')}, serving "
                                             f"{info.get('version')}: invert again")
        images, nfe, version = await self._call("run_decode", latents, body.target_prompt, body.guidance, body.tau)
        size = (int(meta.get("width", 0)), int(meta.get("height", 0)))
        return {"image": to_png(images, size), "nfe": nfe, "model_version": version, "mode": "switch"}

    @api.post("/v1/reconstruct")
    async def reconstruct(self, body: ReconstructBody, x_api_key: str | None = Header(None)) -> dict:
        """Invert and decode with the same prompt, unguided: an edit whose target is its source."""
        self._check_key(x_api_key)
        image = decode_image(body.image)
        picture, nfe, version = await self._call("run_edit", image, body.prompt, body.prompt, 0.0, None, body.seed,
                                                 "switch")
        return {"image": png_of(picture), "nfe": nfe, "model_version": version}

    @api.post("/v1/generate")
    async def generate(self, body: GenerateBody, x_api_key: str | None = Header(None)) -> dict:
        import torch

        from icd.editing.pipeline import per_sample_noise

        self._check_key(x_api_key)
        info = await self._model()
        self._check_steps(body.steps, info)
        side = info["resolution"]
        latent_side = info.get("latent_size", side // 4)
        noise = per_sample_noise((1, info.get("latent_channels", 4), latent_side, latent_side), [body.seed])
        images, nfe, version = await self._call("run_decode", noise.to(torch.float32), body.prompt, body.guidance,
                                                body.tau)
        size = (body.width or side, body.height or side)
        return {"image": to_png(images, size), "nfe": nfe, "model_version": version}


def build_app(args: dict) -> "serve.Application":
    """``serve deploy`` / ``serve.run`` entry: args ``model_uri`` and optional ``editor_options`` /
    ``gateway_options`` (deployment options, e.g. user_config, or a runtime_env with ICD_SERVE_API_KEY)."""
    editor = Editor.options(**(args.get("editor_options") or {})).bind(args.get("model_uri"))
    return Gateway.options(**(args.get("gateway_options") or {})).bind(editor)


app = build_app
