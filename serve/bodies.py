"""Request bodies of the HTTP API, in either form image services are called with.

- ``application/json``: the fields, the image as base64 text in ``image``;
- ``multipart/form-data`` (``curl -F image=@photo.png -F target_prompt=...``): an ``image`` file
  part and the other fields as form fields.

Both go through ``read_body``: the same size cap (413 before anything is decoded), the same
pydantic model and the same error body ``{"error": ..., "field": ...}`` naming the field. The
image travels apart from the model as bytes and is decoded by ``decode_image``. A response is a
PNG instead of JSON when ``response_format`` is ``png`` or the client sends ``Accept: image/png``.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
from typing import Literal

from pydantic import BaseModel, Field, ValidationError, field_validator

MAX_PIXELS = int(os.environ.get("ICD_SERVE_MAX_PIXELS", 4096 * 4096))
MAX_PROMPT_CHARS = 500
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


class ApiError(Exception):
    """An error answered as ``{"error": message, "field": field}`` with ``status``."""

    def __init__(self, status: int, field: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.field, self.message, self.headers = status, field, message, headers or {}


def _prompt(value: str, field: str) -> str:
    value = value.strip()
    if not value:
        raise ValueError(f"{field} must not be empty")
    if len(value) > MAX_PROMPT_CHARS:
        raise ValueError(f"{field} is longer than {MAX_PROMPT_CHARS} characters")
    return value


ResponseFormat = Literal["b64_json", "png"]


class Options(BaseModel):
    guidance: float = Field(7.0, ge=0, le=30, description="code w of the target decode (classical CFG w + 1)")
    tau: float | None = Field(0.8, ge=0, le=1, description="dynamic CFG: unguided while t/1000 > tau; "
                                                            "null (a form field: none) for guidance at every step")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    steps: int | None = Field(None, description="decoder steps; must equal the model's trained steps")
    response_format: ResponseFormat | None = Field(
        None, description="b64_json (JSON with the PNG as base64) or png (the bytes); default: by the Accept header")


class EditBody(Options):
    latent_id: str | None = Field(None, description="from /v1/invert, instead of the image (mode switch)")
    source_prompt: str = ""
    target_prompt: str
    mode: str = Field("switch", pattern="^(switch|p2p|guided)$")

    @field_validator("target_prompt")
    @classmethod
    def _target(cls, v: str) -> str:
        return _prompt(v, "target_prompt")


class InvertBody(BaseModel):
    prompt: str
    seed: int = Field(0, ge=0, le=2**31 - 1)

    @field_validator("prompt")
    @classmethod
    def _p(cls, v: str) -> str:
        return _prompt(v, "prompt")


class ReconstructBody(InvertBody):
    response_format: ResponseFormat | None = None


class GenerateBody(Options):
    prompt: str
    width: int = Field(0, ge=0, le=4096, description="0: the model's resolution")
    height: int = Field(0, ge=0, le=4096)

    @field_validator("prompt")
    @classmethod
    def _p(cls, v: str) -> str:
        return _prompt(v, "prompt")


def checked_source(prompt: str) -> str:
    try:
        return _prompt(prompt, "source_prompt")
    except ValueError as exc:
        raise ApiError(422, "source_prompt", str(exc)) from None


# --- reading a request --------------------------------------------------------------------------

async def _capped_bytes(request, max_bytes: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``max_bytes`` (declared or streamed)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise ApiError(413, "body", f"the body is {declared} bytes, over the {max_bytes}-byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise ApiError(413, "body", f"the body is over the {max_bytes}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def _form_value(value: str):
    """A form field as JSON would give it: empty -> absent, none/null -> None."""
    if value == "":
        return ...
    return None if value.lower() in ("none", "null") else value


async def read_body(request, model: type[BaseModel], max_bytes: int,
                    image: bool = True) -> tuple[BaseModel, bytes | None]:
    """(validated fields, image bytes or None) of a JSON or multipart request."""
    raw = await _capped_bytes(request, max_bytes)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    image_bytes = None
    if kind in FORM_TYPES:
        request._body = raw  # Starlette parses the form from the cached body (what request.body() sets)
        try:
            form = await request.form(max_files=1, max_fields=32)
        except Exception as exc:  # malformed multipart, too many parts
            raise ApiError(400, "body", f"not a readable form: {exc}") from None
        fields = {}
        for key, value in form.multi_items():
            if not isinstance(value, str):  # a file part
                if key != "image" or not image:
                    raise ApiError(422, key, f"unexpected file part {key!r}" + ("; the image goes in the part "
                                                                                "named image" if image else ""))
                image_bytes = await value.read()
            elif key == "image" and image:
                image_bytes = _from_base64(value) if value else None
            elif (converted := _form_value(value)) is not ...:
                fields[key] = converted
    elif kind in ("application/json", ""):
        try:
            fields = json.loads(raw or b"null")
        except ValueError:
            raise ApiError(400, "body", "not valid JSON") from None
        if not isinstance(fields, dict):
            raise ApiError(422, "body", "expected a JSON object with the request's fields")
        if image and (text := fields.pop("image", None)) is not None:
            if not isinstance(text, str):
                raise ApiError(422, "image", "expected base64 text (or send the image as a multipart file part)")
            image_bytes = _from_base64(text)
    else:
        raise ApiError(415, "content-type", f"{kind!r}: expected application/json or multipart/form-data")
    try:
        return model.model_validate(fields), image_bytes
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "body"
        raise ApiError(422, field, first["msg"]) from None


def _from_base64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "image", "not base64 text") from None


def decode_image(raw: bytes | None, field: str = "image"):
    """The RGB picture in ``raw``: 400 for bytes that are no image, 413 over the pixel cap."""
    from PIL import Image

    if not raw:
        raise ApiError(422, field, "missing: give the image (base64 in JSON, or a multipart file part)")
    try:
        picture = Image.open(io.BytesIO(raw))
        width, height = picture.size
        if width * height > MAX_PIXELS:
            raise ApiError(413, field, f"{width}x{height} is over the {MAX_PIXELS}-pixel cap")
        picture.load()
    except ApiError:
        raise
    except Exception:
        raise ApiError(400, field, "the bytes are not a readable image (PNG, JPEG, WebP)") from None
    if min(picture.size) < 1:
        raise ApiError(400, field, "empty image")
    return picture.convert("RGB")


def wants_png(response_format: str | None, accept: str | None) -> bool:
    """``response_format`` decides; without it, an Accept header that names image/png."""
    if response_format is not None:
        return response_format == "png"
    types = [part.split(";")[0].strip().lower() for part in (accept or "").split(",")]
    return "image/png" in types


# --- what /docs shows -----------------------------------------------------------------------------

def request_body_doc(model: type[BaseModel], image: str | None = "required") -> dict:
    """The OpenAPI ``requestBody`` with both forms: JSON (image as base64) and multipart (image as a file)."""
    schema = model.model_json_schema()
    schema.pop("title", None)

    def with_image(image_schema: dict) -> dict:
        if image is None:
            return schema
        out = {**schema, "properties": {"image": image_schema, **schema.get("properties", {})}}
        if image == "required":
            out["required"] = ["image", *schema.get("required", [])]
        return out
    return {"required": True, "content": {
        "application/json": {"schema": with_image({"type": "string", "format": "byte",
                                                   "description": "the image as base64 (PNG, JPEG, WebP)"})},
        "multipart/form-data": {"schema": with_image({"type": "string", "format": "binary",
                                                      "description": "the image file"})},
    }}


def image_responses() -> dict:
    return {200: {"description": "JSON with the PNG as base64, or with Accept: image/png (or response_format png) "
                                 "the PNG itself, its NFE, model version and mode in X-ICD-* headers",
                  "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}}}
