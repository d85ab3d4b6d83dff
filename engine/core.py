"""The engine core: streams in, one batched model call per group per tick, frames out.

Pure and single-threaded: ``add``/``reconfigure``/``remove``/``submit`` change state and ``step()``
advances every stream's pipeline by one stage. The runner (``engine.runner``) owns the thread and
the control inbox; tests drive the core directly.

One tick (``step``):
 1. take each stream's newest input (latest wins), run the similarity filter, and enter the frame
    at its first angle (VAE-encode all new frames of a size in one call);
 2. gather every in-flight latent of every stream, group by latent shape and prompt length, and
    denoise each group in calls of at most ``max_batch`` samples (per-sample angle, embedding,
    mask and guidance);
 3. re-noise unfinished latents to their next angle with the plan's fixed noise; decode finished
    ones (batched);
 4. emit finished frames from the front of each pipeline, in input order.
A stream's output never depends on which other streams shared its batch (tested: isolation).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable

import torch
from ditstream.engine import images as imgs
from ditstream.engine import sampler
from ditstream.engine.backends.base import Backend, BackendLimits
from ditstream.engine.config import EngineConfig, StreamConfig
from ditstream.engine.errors import GenerationError, ValidationError
from ditstream.engine.loader import ModelComponents
from ditstream.engine.plan import Plan, decode_clean, encode_clean, make_plan, predict_x0
from ditstream.engine.prompt_cache import PromptCache
from ditstream.engine.queues import OutputQueue
from ditstream.engine.similarity import SimilarityFilter
from ditstream.engine.stream import InFlight, StreamState, new_stream_id
from ditstream.engine.types import Frame, StreamOutput

logger = logging.getLogger(__name__)


class EngineCore:
    """Stream-batched, cross-stream-batched SANA-Sprint sampling."""

    def __init__(self, components: ModelComponents, backend: Backend, prompts: PromptCache,
                 config: EngineConfig | None = None) -> None:
        self.components = components
        self.backend = backend
        self.prompts = prompts
        self.config = config or EngineConfig()
        self.streams: dict[str, StreamState] = {}
        #: Sizes of the model calls made, for metrics and the bench.
        self.batch_sizes: list[int] = []
        self.on_batch: Callable[[int, float], None] | None = None

    # ------------------------------------------------------------------ streams
    @property
    def size_multiple(self) -> int:
        return self.components.vae_scale_factor * int(self.components.transformer.config.patch_size)

    @property
    def limits(self) -> BackendLimits:
        """The backend's bounds (none for a core without a backend, e.g. the null engine)."""
        backend = getattr(self, "backend", None)
        return backend.limits if backend is not None else BackendLimits()

    @property
    def max_batch(self) -> int:
        """Samples per model call: the configured bound, never more than the backend takes."""
        limit = self.limits.max_batch
        return min(self.config.max_batch, limit) if limit is not None else self.config.max_batch

    def validate(self, cfg: StreamConfig) -> StreamConfig:
        cfg = cfg.validate(max_prompt_chars=self.config.max_prompt_chars, max_pixels=self.config.max_pixels,
                           size_multiple=self.size_multiple)
        self.limits.check_size(cfg.width, cfg.height)
        return cfg

    def add(self, cfg: StreamConfig, *, stream_id: str | None = None, one_shot: bool = False,
            notify: Callable[[], None] | None = None) -> StreamState:
        cfg = self.validate(cfg)
        sid = stream_id or new_stream_id("job" if one_shot else "s")
        state = StreamState(
            id=sid, config=cfg, plan=self._plan(cfg),
            outputs=OutputQueue(self.config.output_queue_size, notify), filter=SimilarityFilter(cfg.filter, cfg.seed),
            one_shot=one_shot,
        )
        self.streams[sid] = state
        return state

    def _plan(self, cfg: StreamConfig) -> Plan | None:
        return make_plan(cfg, self.components, self.prompts)

    def reconfigure(self, stream_id: str, cfg: StreamConfig) -> StreamConfig:
        """New frames use ``cfg``; frames in flight finish with the plan they entered with."""
        state = self.streams[stream_id]
        cfg = self.validate(cfg)
        state.plan = self._plan(cfg)
        state.filter.reconfigure(cfg.filter)
        state.config = cfg
        return cfg

    def remove(self, stream_id: str) -> StreamState | None:
        """Forget a stream and everything it had in flight (cancelled work is simply dropped)."""
        state = self.streams.pop(stream_id, None)
        if state is not None:
            state.outputs.close()
        return state

    def submit(self, stream_id: str, frame: Frame) -> bool:
        """Offer a frame (latest wins); returns True if it replaced an unprocessed one."""
        state = self.streams[stream_id]
        if frame.image is not None:
            imgs.check_image(frame.image, state.config.width, state.config.height)
        elif state.config.mode == "img2img":
            raise ValidationError("img2img streams need an image in every frame", field="image")
        if not frame.received_at:
            frame.received_at = time.perf_counter()
        replaced = state.inbox.put(frame)
        if replaced:
            state.stats.dropped_inputs += 1
        return replaced

    def has_work(self) -> bool:
        return any(s.busy for s in self.streams.values())

    # ------------------------------------------------------------------ tick
    @torch.inference_mode()
    def step(self) -> list[StreamOutput]:
        """Advance every stream by one stage; returns the outputs emitted (also queued per stream)."""
        self._admit_new_frames()
        self._denoise_all()
        return self._emit()

    def flush(self, max_ticks: int = 64) -> list[StreamOutput]:
        """Run ticks until nothing is in flight (end of a clip); returns all outputs."""
        out: list[StreamOutput] = []
        for _ in range(max_ticks):
            if not self.has_work():
                break
            out.extend(self.step())
        return out

    def _admit_new_frames(self) -> None:
        c = self.components
        to_encode: dict[tuple[int, int], list[InFlight]] = defaultdict(list)
        now = time.perf_counter()
        for state in self.streams.values():
            frame = state.inbox.take()
            if frame is None:
                continue
            plan = state.plan
            item = InFlight(frame=frame, plan=plan, x=None, taken_at=now)
            if frame.image is not None and state.filter.should_skip(frame.image):
                item.skipped = True
                item.stage = plan.steps  # travels without compute
            elif frame.image is None or plan.config.mode == "txt2img":
                item.x = sampler.entry_latent(plan.angles[:1], plan.noise[:1], c.sigma_data)
            else:
                to_encode[frame.image.shape[:2]].append(item)
            state.pipeline.append(item)
        for items in to_encode.values():
            for chunk in _chunks(items, self.max_batch):
                t0 = time.perf_counter()
                clean = encode_clean(self.backend, c, imgs.to_tensor([it.frame.image for it in chunk], c.device))
                t1 = torch.cat([it.plan.angles[:1] for it in chunk])
                noise = torch.cat([it.plan.noise[:1] for it in chunk])
                x = sampler.entry_latent(t1, noise, c.sigma_data, clean)
                dt = time.perf_counter() - t0
                for i, it in enumerate(chunk):
                    it.x = x[i : i + 1]
                    it.inference_s += dt

    def _denoise_all(self) -> None:
        c = self.components
        groups: dict[tuple, list[InFlight]] = defaultdict(list)
        for state in self.streams.values():
            for it in state.pipeline:
                if it.x is not None and not it.done:
                    groups[(it.plan.latent_shape, it.plan.embeds.shape[1:])].append(it)
        finished: dict[tuple, list[InFlight]] = defaultdict(list)
        for key, items in groups.items():
            for chunk in _chunks(items, self.max_batch):
                t0 = time.perf_counter()
                x = torch.cat([it.x for it in chunk])
                t = torch.stack([it.plan.angles[it.stage] for it in chunk])
                embeds = torch.cat([it.plan.embeds for it in chunk])
                mask = torch.cat([it.plan.mask for it in chunk])
                guidance = torch.cat([it.plan.guidance for it in chunk])
                x0 = predict_x0(self.backend, c, x, t, embeds, mask, guidance)
                for i, it in enumerate(chunk):
                    it.stage += 1
                    if it.done:
                        it.x = x0[i : i + 1]
                        finished[key[0]].append(it)
                    else:
                        it.x = sampler.renoise(x0[i : i + 1], it.plan.angles[it.stage : it.stage + 1],
                                               it.plan.noise[it.stage : it.stage + 1], c.sigma_data)
                dt = time.perf_counter() - t0
                self.batch_sizes.append(len(chunk))
                if self.on_batch is not None:
                    self.on_batch(len(chunk), dt)
                for it in chunk:
                    it.inference_s += dt
        for items in finished.values():
            for chunk in _chunks(items, self.max_batch):
                t0 = time.perf_counter()
                unit = imgs.to_unit(decode_clean(self.backend, c, torch.cat([it.x for it in chunk])))
                if not torch.isfinite(unit).all():
                    raise GenerationError("the model produced non-finite values (NaN/inf)")
                arr = unit.numpy() if self.config.output_float else imgs.to_uint8(unit)
                dt = time.perf_counter() - t0
                for i, it in enumerate(chunk):
                    it.result = arr[i]
                    it.x = None
                    it.inference_s += dt

    def _emit(self) -> list[StreamOutput]:
        out: list[StreamOutput] = []
        now = time.perf_counter()
        for state in list(self.streams.values()):
            while state.pipeline and state.pipeline[0].done:
                it = state.pipeline.popleft()
                if it.skipped:
                    image = state.last_output
                    if image is None:  # nothing to repeat yet: cannot happen (first frame is processed)
                        continue
                    state.stats.skipped += 1
                else:
                    image = it.result
                    state.last_output = image
                    state.stats.processed += 1
                f = it.frame
                output = StreamOutput(
                    stream_id=state.id, seq=f.seq, ts=f.ts, image=image, skipped=it.skipped,
                    timings={"queue": it.taken_at - f.received_at, "inference": it.inference_s,
                             "total": now - f.received_at},
                )
                before = state.outputs.dropped
                state.outputs.put(output)
                state.stats.dropped_outputs += state.outputs.dropped - before
                if state.on_output is not None:
                    state.on_output(output)
                out.append(output)
        return out


def _chunks(items: list[InFlight], size: int) -> Iterable[list[InFlight]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
