"""The HTTP API (OpenAPI at /docs) and the web page at /, as the ``Gateway`` ingress deployment.

Every image endpoint takes JSON (the image as base64) or multipart/form-data (an ``image`` file
part), and answers JSON or, with ``Accept: image/png`` / ``response_format=png``, the PNG bytes
with ``X-ICD-NFE``, ``X-ICD-Model-Version`` and ``X-ICD-Mode`` headers. Errors are
``{"error": ..., "field": ...}`` with a 4xx naming the field, whichever form the request took.
"""

import asyncio
import logging
import os
import time
from pathlib import Path

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.exceptions import BackPressureError

from serve.bodies import (DEFAULT_MAX_BODY_BYTES, ApiError, EditBody, GenerateBody, InvertBody, ReconstructBody,
                          checked_source, decode_image, image_responses, read_body, request_body_doc, wants_png)
from serve.examples import check_examples_config, png_base64, shapes_examples
from serve.latents import DEFAULT_TTL_S, LatentError, LatentStore

PAGE = Path(__file__).with_name("page.html")
log = logging.getLogger("ray.serve")

api = FastAPI(title="icd editor", version="1",
              description="Invertible consistency-distilled image editing: 4 forward + 4 reverse UNet passes. "
                          "Image endpoints take JSON (image as base64) or multipart/form-data (an image file part).")


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse({"error": exc.message, "field": exc.field}, status_code=exc.status, headers=exc.headers)


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("request failed")
    return JSONResponse({"error": f"{type(exc).__name__}: {str(exc)[:500]}", "field": "server"}, status_code=500)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first["loc"] if p not in ("body", "path", "query")) or "body"
    return JSONResponse({"error": first["msg"], "field": field}, status_code=422)


def image_reply(picture, nfe: int, version: str, mode: str, png: bool, started: float) -> Response:
    """The picture as PNG bytes (its facts in headers) or as JSON with the PNG in base64."""
    elapsed_ms = round((time.perf_counter() - started) * 1000, 1)
    if png:
        import io

        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        return Response(buffer.getvalue(), media_type="image/png",
                        headers={"X-ICD-NFE": str(nfe), "X-ICD-Model-Version": str(version), "X-ICD-Mode": mode,
                                 "X-ICD-Elapsed-Ms": str(elapsed_ms)})
    return JSONResponse({"image": png_base64(picture), "nfe": nfe, "model_version": version, "mode": mode,
                         "elapsed_ms": elapsed_ms})


def first_picture(images, size: tuple[int, int]):
    """The first image of a (B, 3, h, w) batch in [-1, 1] as a picture at ``size``."""
    from icd.editing.pipeline import to_pictures

    return to_pictures(images, [size])[0]


REPLICA_RETRIES, RETRY_BACKOFF_S = 3, 0.5  # ~0.5 + 1 + 2 s: long enough for Serve to route to a live replica


async def call_with_retries(call, what: str, retries: int = REPLICA_RETRIES, backoff_s: float = RETRY_BACKOFF_S):
    """Await ``call()``; when the replica serving it died, call again after 0.5, 1, 2 s (``retries`` times at most)."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError

    for attempt in range(retries + 1):
        try:
            return await call()
        except (ActorDiedError, ActorUnavailableError) as exc:
            if attempt == retries:
                raise ApiError(503, "server", f"the model replica failed {retries + 1} times during {what}; "
                               "retry shortly", {"Retry-After": "2"}) from None
            log.warning("%s: replica lost (%s); retrying (%d of %d)", what, type(exc).__name__, attempt + 1, retries)
            await asyncio.sleep(backoff_s * 2 ** attempt)


@serve.deployment(max_ongoing_requests=32, max_queued_requests=64, backpressure_config={"retry_after_s": 1},
                  ray_actor_options={"num_cpus": 0.25})
@serve.ingress(api)
class Gateway:
    def __init__(self, editor, api_key_env: str = "ICD_SERVE_API_KEY", latent_ttl_s: float = DEFAULT_TTL_S,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, examples: dict | None = None):
        if not isinstance(max_body_bytes, int) or max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes: expected an integer >= 1024, got {max_body_bytes!r}")
        self.editor = editor
        self.api_key = os.environ.get(api_key_env) or None
        self.latents = LatentStore(ttl_s=latent_ttl_s)
        self.max_body_bytes = max_body_bytes
        self.examples_config = check_examples_config(examples)
        self._examples: list[dict] | None = None

    def _check_key(self, key: str | None) -> None:
        if self.api_key and key != self.api_key:
            raise ApiError(401, "x-api-key", "missing or wrong API key (header X-API-Key)")

    async def _call(self, method: str, *args):
        try:
            # Every Editor call is idempotent (a pure function of its inputs and seed), so one that
            # a dying replica dropped is sent again, to the replica Serve starts in its place.
            return await call_with_retries(lambda: getattr(self.editor, method).remote(*args), method)
        except BackPressureError:
            raise ApiError(503, "server", "busy: the request queue is full, retry shortly", {"Retry-After": "1"}) from None

    async def _model(self) -> dict:
        return await self.editor.info.remote()

    def _check_steps(self, steps: int | None, info: dict) -> None:
        if steps is not None and steps != info.get("steps", 4):
            raise ApiError(422, "steps", f"this model decodes in {info.get('steps', 4)} steps; got {steps}")

    def _latents(self, operation, *args):
        try:
            return operation(*args)
        except LatentError as exc:
            raise ApiError(exc.status, "latent_id", exc.message) from None

    def _sweep_soon(self) -> None:
        """Delete expired latents from a worker thread (at most every ``sweep_every_s``)."""
        def sweep():
            try:
                deleted = self.latents.sweep_if_due()
                if deleted:
                    log.info("deleted %d expired latents", deleted)
            except Exception:  # a failed sweep is retried at the next one; never fails a request
                log.warning("latent sweep failed", exc_info=True)
        asyncio.get_running_loop().run_in_executor(None, sweep)

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

    @api.get("/v1/examples")
    async def examples(self) -> list[dict]:
        """Pictures to try the editor on: {image (base64 PNG), source_prompt, target_prompt}."""
        if self._examples is None:
            config = self.examples_config
            if config["source"] == "shapes":
                self._examples = shapes_examples(config["count"])
            else:
                self._examples = [await self._generated_example(p, i)
                                  for i, p in enumerate(config["prompts"][:config["count"]])]
        return self._examples

    async def _generated_example(self, prompt: dict, seed: int) -> dict:
        picture, _, _ = await self._generate(prompt["prompt"], 7.0, 0.8, seed, 0, 0)
        return {"image": png_base64(picture), "source_prompt": prompt["prompt"], "target_prompt": prompt["target"]}

    @api.post("/v1/invert", openapi_extra={"requestBody": request_body_doc(InvertBody)})
    async def invert(self, request: Request, x_api_key: str | None = Header(None),
                     accept: str | None = Header(None)) -> dict:
        """Invert an image once (4 NFE); edit it many times with ``latent_id`` (4 NFE each)."""
        self._check_key(x_api_key)
        if wants_png(None, accept) and "application/json" not in (accept or ""):
            raise ApiError(406, "accept", "/v1/invert answers JSON with a latent_id, not an image")
        body, raw = await read_body(request, InvertBody, self.max_body_bytes)
        image = decode_image(raw)
        latents, nfe, version = await self._call("run_invert", image, body.prompt, body.seed)
        latent_id = self.latents.put(latents, {"version": version, "width": image.width, "height": image.height,
                                               "prompt": body.prompt})
        self._sweep_soon()
        return {"latent_id": latent_id, "nfe": nfe, "model_version": version,
                "expires_in_s": self.latents.ttl_s}

    @api.delete("/v1/latents/{latent_id}", status_code=204, responses={404: {"description": "unknown or expired"}})
    async def delete_latent(self, latent_id: str, x_api_key: str | None = Header(None)) -> Response:
        """Forget an inverted image now, before its TTL."""
        self._check_key(x_api_key)
        self._latents(self.latents.delete, latent_id)
        return Response(status_code=204)

    @api.post("/v1/edit", openapi_extra={"requestBody": request_body_doc(EditBody, image="optional")},
              responses=image_responses())
    async def edit(self, request: Request, x_api_key: str | None = Header(None),
                   accept: str | None = Header(None)) -> Response:
        """Edit: the image (or a ``latent_id``), its source prompt and the target prompt."""
        started = time.perf_counter()
        self._check_key(x_api_key)
        body, raw = await read_body(request, EditBody, self.max_body_bytes)
        png = wants_png(body.response_format, accept)
        if body.steps is not None:
            self._check_steps(body.steps, await self._model())
        if (raw is None) == (body.latent_id is None):
            raise ApiError(422, "image", "give exactly one of image or latent_id")
        if raw is not None:  # one call: invert + decode in the Editor's edit batch
            image = decode_image(raw)
            picture, nfe, version = await self._call("run_edit", image, checked_source(body.source_prompt),
                                                     body.target_prompt, body.guidance, body.tau, body.seed,
                                                     body.mode)
            return image_reply(picture, nfe, version, body.mode, png, started)
        if body.mode != "switch":
            raise ApiError(422, "mode", f"mode {body.mode} needs the image (it re-inverts with attention control)")
        latents, meta = self._latents(self.latents.get, body.latent_id)
        info = await self._model()
        if meta.get("version") != info.get("version"):
            raise ApiError(409, "latent_id", f"made by model version {meta.get('version')}, serving "
                                             f"{info.get('version')}: invert again")
        images, nfe, version = await self._call("run_decode", latents, body.target_prompt, body.guidance, body.tau)
        size = (int(meta.get("width", 0)), int(meta.get("height", 0)))
        return image_reply(first_picture(images, size), nfe, version, "switch", png, started)

    @api.post("/v1/reconstruct", openapi_extra={"requestBody": request_body_doc(ReconstructBody)},
              responses=image_responses())
    async def reconstruct(self, request: Request, x_api_key: str | None = Header(None),
                          accept: str | None = Header(None)) -> Response:
        """Invert and decode with the same prompt, unguided: an edit whose target is its source."""
        started = time.perf_counter()
        self._check_key(x_api_key)
        body, raw = await read_body(request, ReconstructBody, self.max_body_bytes)
        image = decode_image(raw)
        picture, nfe, version = await self._call("run_edit", image, body.prompt, body.prompt, 0.0, None, body.seed,
                                                 "switch")
        return image_reply(picture, nfe, version, "reconstruct", wants_png(body.response_format, accept), started)

    @api.post("/v1/generate", openapi_extra={"requestBody": request_body_doc(GenerateBody, image=None)},
              responses=image_responses())
    async def generate(self, request: Request, x_api_key: str | None = Header(None),
                       accept: str | None = Header(None)) -> Response:
        """Text to image in the model's decoder steps (4 NFE)."""
        started = time.perf_counter()
        self._check_key(x_api_key)
        body, _ = await read_body(request, GenerateBody, self.max_body_bytes, image=False)
        picture, nfe, version = await self._generate(body.prompt, body.guidance, body.tau, body.seed, body.width,
                                                     body.height, body.steps)
        return image_reply(picture, nfe, version, "generate", wants_png(body.response_format, accept), started)

    async def _generate(self, prompt: str, guidance: float, tau, seed: int, width: int, height: int,
                        steps: int | None = None) -> tuple:
        import torch

        from icd.editing.pipeline import per_sample_noise

        info = await self._model()
        self._check_steps(steps, info)
        side = info["resolution"]
        latent_side = info.get("latent_size", side // 4)
        noise = per_sample_noise((1, info.get("latent_channels", 4), latent_side, latent_side), [seed])
        images, nfe, version = await self._call("run_decode", noise.to(torch.float32), prompt, guidance, tau)
        return first_picture(images, (width or side, height or side)), nfe, version
