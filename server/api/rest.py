"""REST in the OpenAI Images API shape: ``/v1/images/generations``, ``/v1/images/edits``, ``/v1/models``.

The ``openai`` client works unchanged with ``base_url=http://host:port/v1``. Fields the OpenAI API
has and we do not use (quality, style, user, background, ...) are accepted and ignored; our own
extensions (seed, steps, strength, guidance_scale) ride in the same body (``extra_body`` in the
``openai`` client). Each image is one engine job batched with the live streams; a request takes
``n`` queued-job permits up front (429 + Retry-After when full) and a client that disconnects
cancels its jobs.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from concurrent.futures import Future
from typing import Annotated, Any, Literal

import numpy as np
from ditstream.engine.blend import MAX_BLEND
from ditstream.engine.config import StreamConfig
from ditstream.engine.errors import CancelledError, GenerationError, PayloadTooLargeError, ValidationError
from ditstream.engine.sizes import parse_size
from ditstream.engine.types import StreamOutput
from ditstream.server import codec
from ditstream.server.api.state import AppState, state_of
from ditstream.server.live import timing
from fastapi import APIRouter, File, Form, Request, UploadFile
from pydantic import BaseModel, ConfigDict, Field

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["images"])

OutputFormat = Literal["png", "jpeg", "webp"]
#: Quality of JPEG and WebP responses (PNG is lossless).
OUTPUT_QUALITY = 95


class PromptWeight(BaseModel):
    """One entry of a prompt blend (``prompts``)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    text: str
    weight: float = Field(1.0, ge=0, allow_inf_nan=False,
                          description="Relative weight, >= 0 (at least one > 0); the weights are normalised.")


class GenerationRequest(BaseModel):
    """``POST /v1/images/generations`` (JSON).

    Strict types: the body is JSON, so ``"guidance_scale": false`` or ``"n": 1.5`` is a client bug to
    refuse (422), not to coerce — and the OpenAPI schema then says exactly what is accepted.
    """

    model_config = ConfigDict(extra="ignore", strict=True)
    prompt: str | None = Field(None, description="What to draw (required unless `prompts` is given).")
    model: str | None = Field(None, description="Accepted for compatibility; the server's model is used.")
    n: int = Field(1, ge=1, description="Images to make (each a different seed).")
    size: str | None = Field(None, description="'WxH' (multiples of the model's size multiple) or 'auto'.")
    response_format: Literal["b64_json", "url"] | None = Field(None, description="Only b64_json is supported.")
    output_format: OutputFormat | None = Field(None, description="Encoding of the images (default png).")
    seed: int | None = Field(None, ge=0, description="Seed of the first image; image i uses seed + i.")
    steps: int | None = Field(None, description="Model calls per image (1-4).")
    guidance_scale: float | None = None
    prompts: list[PromptWeight] | None = Field(
        None, min_length=1, max_length=MAX_BLEND, description="A prompt blend mixed in embedding space; replaces `prompt` for the model "
                          "(`prompt` may then be left out; when given it is echoed as revised_prompt).")
    prompt_interpolation: Literal["linear", "slerp"] | None = Field(None, description="How `prompts` are mixed.")
    loras: dict[str, float] | None = Field(
        None, description="LoRA adapter scales {name: scale} (names left out are off; omitted: each adapter at "
                          "its default scale); the adapters are listed by /v1/models.")


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: OutputFormat
    size: str


class ModelDefaults(BaseModel):
    """The settings a new stream starts with (the model's own; the size may be the server's)."""

    prompt: str
    width: int
    height: int
    steps: int
    strength: float
    guidance_scale: float


class LoraCard(BaseModel):
    name: str
    default_scale: float = Field(description="The scale a stream or request gets unless it picks one.")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ditstream"
    backend: str | None = Field(None, description="The inference backend (torch, onnx, tensorrt, ...).")
    native_size: str | None = Field(None, description="'WxH' the model was made for (null if it states none).")
    size_multiple: int | None = Field(None, description="Sizes must be multiples of this.")
    defaults: ModelDefaults | None = None
    loras: list[LoraCard] = Field(default_factory=list, description="LoRA adapters loaded (pick with `loras`).")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "body is not JSON, or the upload is not an image"},
    401: {"description": "missing or invalid API key"},
    413: {"description": "upload over the size limit, or an image over the pixel limit"},
    422: {"description": "invalid field (the message names it)"},
    429: {"description": "queue full; retry after Retry-After seconds"},
    499: {"description": "the client went away; its queued images were cancelled"},
    500: {"description": "the model failed or timed out"},
    503: {"description": "engine not running"},
}


@router.get("/models", response_model=ModelList, summary="The model this server serves.")
async def list_models(request: Request) -> ModelList:
    state = state_of(request.app)
    card = state.model_card()
    return ModelList(data=[ModelCard(id=str(card["model"]), created=int(state.started_at), backend=card["backend"],
                                     native_size=card["native_size"], size_multiple=card["size_multiple"],
                                     defaults=ModelDefaults(**card["defaults"]),
                                     loras=[LoraCard(name=n, default_scale=v) for n, v in card["loras"].items()])])


@router.post("/images/generations", response_model=ImagesResponse, responses=_ERRORS,
             summary="Text to image (OpenAI Images API shape).")
async def generations(body: GenerationRequest, request: Request) -> ImagesResponse:
    received_at = timing.clock()
    state = state_of(request.app)
    _check_common(state, body.n, body.response_format)
    width, height = _size(state, body.size)
    prompt: str | list[dict[str, Any]]
    if body.prompts is not None:
        prompt = [p.model_dump() for p in body.prompts]
    elif body.prompt is not None:
        prompt = body.prompt
    else:  # the openai client always sends prompt; a curl user with a blend need not
        raise ValidationError("prompt is required (or prompts, a blend of prompts)", field="prompt")
    base = _base_config(state, "txt2img", prompt, width, height, body.seed, body.steps, body.guidance_scale,
                        interpolation=body.prompt_interpolation, loras=body.loras)
    cfgs = [base.replace(seed=base.seed + i) for i in range(body.n)]
    fmt = body.output_format or "png"
    outputs = await _run_jobs(state, request, cfgs, [None] * body.n, fmt)
    return await _respond(state, outputs, fmt, body.prompt, received_at)


@router.post("/images/edits", response_model=ImagesResponse, responses=_ERRORS,
             summary="Image to image (OpenAI Images API shape, multipart).")
async def edits(
    request: Request,
    prompt: Annotated[str, Form(min_length=1, description="What to turn the image into (an empty form "
                                                           "field counts as missing).")],
    image: Annotated[list[UploadFile] | None, File(description="The input image (PNG/JPEG/WebP).")] = None,
    image_array: Annotated[list[UploadFile] | None, File(alias="image[]", description="Same, as sent for lists.")] = None,
    mask: Annotated[UploadFile | None, File(description="Not supported (refused if given).")] = None,
    model: Annotated[str | None, Form()] = None,
    n: Annotated[int, Form(ge=1)] = 1,
    size: Annotated[str | None, Form(description="'WxH'; default: the image's size rounded down.")] = None,
    response_format: Annotated[Literal["b64_json", "url"] | None, Form()] = None,
    output_format: Annotated[OutputFormat | None, Form()] = None,
    strength: Annotated[float | None, Form(description="How far from the input to go, (0, 1].")] = None,
    seed: Annotated[int | None, Form(ge=0)] = None,
    steps: Annotated[int | None, Form()] = None,
    guidance_scale: Annotated[float | None, Form()] = None,
) -> ImagesResponse:
    received_at = timing.clock()
    state = state_of(request.app)
    _check_common(state, n, response_format)
    if mask is not None:
        raise ValidationError("mask is not supported: the whole image is re-rendered", field="mask")
    files = [*(image or []), *(image_array or [])]
    if len(files) != 1:
        raise ValidationError(f"exactly one image is needed, got {len(files)}", field="image")
    data = await files[0].read(state.settings.max_upload_bytes + 1)
    if len(data) > state.settings.max_upload_bytes:
        raise PayloadTooLargeError(f"image is over the upload limit of {state.settings.max_upload_bytes} bytes",
                                   field="image")
    loop = asyncio.get_running_loop()
    pixels = await loop.run_in_executor(state.codec.pool, lambda: codec.decode(
        data, max_pixels=state.settings.max_pixels))
    if size is None or size == "auto":
        mult = state.limits.size_multiple
        width, height = max(mult, pixels.shape[1] // mult * mult), max(mult, pixels.shape[0] // mult * mult)
    else:
        width, height = _size(state, size)
    base = _base_config(state, "img2img", prompt, width, height, seed, steps, guidance_scale, strength)
    fitted = await loop.run_in_executor(state.codec.pool, codec.resize, pixels, width, height)
    cfgs = [base.replace(seed=base.seed + i) for i in range(n)]
    fmt = output_format or "png"
    outputs = await _run_jobs(state, request, cfgs, [fitted] * n, fmt)
    return await _respond(state, outputs, fmt, prompt, received_at)


# ---------------------------------------------------------------------------------------- helpers
def _check_common(state: AppState, n: int, response_format: str | None) -> None:
    state.require_engine()
    if n > state.settings.max_images_per_request:
        raise ValidationError(f"n is {n}; the limit is {state.settings.max_images_per_request}", field="n")
    if response_format == "url":
        raise ValidationError("response_format 'url' is not supported; use 'b64_json'", field="response_format")


def _size(state: AppState, size: str | None) -> tuple[int, int]:
    if size is None or size == "auto":
        d = state.stream_defaults()
        return int(d["width"]), int(d["height"])
    return parse_size(size)


def _base_config(state: AppState, mode: str, prompt: str | list[dict[str, Any]], width: int, height: int,
                 seed: int | None, steps: int | None, guidance: float | None, strength: float | None = None, *,
                 interpolation: str | None = None, loras: dict[str, float] | None = None) -> StreamConfig:
    d = state.stream_defaults()
    d.update(mode=mode, prompt=prompt, width=width, height=height)
    if interpolation is not None:
        d["prompt_interpolation"] = interpolation
    if loras is not None:
        d["loras"] = loras
    for k, v in (("seed", seed), ("steps", steps), ("guidance_scale", guidance), ("strength", strength)):
        if v is not None:
            d[k] = v
    if seed is None:
        d["seed"] = int(np.random.default_rng().integers(0, 2**31))
    return state.validate(StreamConfig(**d))


async def _run_jobs(state: AppState, request: Request, cfgs: list[StreamConfig],
                    images: list[np.ndarray | None], fmt: OutputFormat) -> list[StreamOutput]:
    """Submit one engine job per image (to be coded as ``fmt``: a gateway's workers code it so);
    cancel them all if the client leaves or time runs out."""
    runner = state.require_engine()
    with state.admission.jobs.acquire(len(cfgs)):
        futures: list[Future] = []
        try:
            for cfg, img in zip(cfgs, images, strict=True):
                futures.append(runner.submit_job(cfg, img, encode=(fmt, OUTPUT_QUALITY)))
            results = asyncio.ensure_future(asyncio.gather(*[asyncio.wrap_future(f) for f in futures]))
            gone = asyncio.ensure_future(_disconnected(request))
            done, _ = await asyncio.wait({results, gone}, timeout=state.settings.job_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            gone.cancel()
            if results in done:
                outputs: list[StreamOutput] = results.result()
            else:
                results.cancel()
                with contextlib.suppress(BaseException):
                    await results
                if gone in done:
                    logger.info("client left: cancelled %d queued image(s)", len(futures))
                    raise CancelledError("client disconnected")
                raise GenerationError(f"no result within {state.settings.job_timeout_s} s")
        finally:
            for f in futures:
                f.cancel()  # no-op for finished jobs; removes queued ones from the engine
    return outputs


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body is already read, so only a disconnect is left)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _respond(state: AppState, outputs: list[StreamOutput], fmt: OutputFormat, prompt: str | None,
                   received_at: float) -> ImagesResponse:
    """Code the images (in the codec pool), or send what a worker already coded as ``fmt`` as it is;
    the request's timings go to the metrics as a stream frame's do (glass-to-glass: ``timing.py``)."""
    loop = asyncio.get_running_loop()

    async def blob(o: StreamOutput) -> bytes:
        if o.encoded is not None and o.encoded.format == fmt:
            return o.encoded.data

        def recode() -> bytes:
            image = o.image if o.image is not None else codec.decode(o.encoded.data,  # type: ignore[union-attr]
                                                                     max_pixels=state.settings.max_pixels)
            return codec.encode(image, fmt, OUTPUT_QUALITY)

        return await loop.run_in_executor(state.codec.pool, recode)

    blobs = await asyncio.gather(*[blob(o) for o in outputs])
    m = state.metrics
    for out in outputs:
        m.queue_seconds.observe(out.timings.get("queue", 0.0))
        m.inference_seconds.observe(out.timings.get("inference", 0.0))
    m.e2e_seconds.observe(timing.glass_to_glass(received_at, timing.clock()))
    first = outputs[0]
    w, h = (first.encoded.width, first.encoded.height) if first.encoded is not None else first.image.shape[1::-1]
    return ImagesResponse(created=int(time.time()), output_format=fmt, size=f"{w}x{h}",
                          data=[ImageData(b64_json=base64.b64encode(b).decode("ascii"), revised_prompt=prompt)
                                for b in blobs])
