"""The engine core: streams in, one batched model call per group per tick, frames out.

One owner thread: ``add``/``reconfigure``/``remove`` change the stream table and ``step()`` advances
every stream's pipeline by one stage, all on the thread that owns the core (the runner's engine
thread, ``engine.runner``; a test's own thread when it drives the core directly). The one entry
from other threads is ``offer`` (below; ``submit`` is ``offer`` by stream id): a codec or event-loop
thread puts a frame into one stream's locked inbox and touches nothing else. The core keeps no
clock of its own: ``clock`` (default ``time.perf_counter``) stamps every time it reads, so a test
can drive ticks on a fake one.

One tick (``step``):
 1. take each stream's oldest pending input (``queues.FrameInbox``: two deep, latest wins only over a
    frame that sat through a tick), move a gliding stream one step along its transition, run the
    similarity filter (not while gliding), and enter the frame at its first angle (VAE-encode all
    new frames of a size in one call; with ``feedback`` the clean latent is first mixed with the
    stream's last output latent, ``sampler.feedback_blend``);
 2. gather every in-flight latent of every stream, group by latent shape, prompt length and LoRA
    adapter set (``plan.loras``: one set per call, so styles never leak across streams), and denoise each group in calls of at most ``max_batch`` samples (per-sample angle, embedding,
    mask and guidance);
 3. re-noise unfinished latents to their next angle with the plan's fixed noise; decode finished
    ones (batched);
 4. emit finished frames from the front of each pipeline, in input order.
A stream's output never depends on which other streams shared its batch (tested: isolation).

When a tick starts is the batch policy's call (``engine.batching``; the runner asks ``batch_wait``
before each tick): it holds a tick, at most half a tick, for frames expected from streams that have
none yet, so closed-loop clients share calls instead of alternating. Every tick takes one frame from
every stream that has one, so no stream starves and equal demand gets equal rates.

Failure isolation: an exception in one model call (an encode, denoise or decode chunk) fails only
the frames of that call, and a non-finite (NaN/inf) output fails only its own samples. A failed
frame drops its latent and is emitted in its place in the stream's order as an output carrying a
``GenerationError`` and no image; the stream goes on with its next input. Only an unrecoverable
device error (``errors.is_fatal_device_error``) leaves ``step()``: the runner then stops the engine.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable

import torch
from ditstream.engine import images as imgs
from ditstream.engine import sampler, temporal_stream
from ditstream.engine.backends.base import Backend, BackendLimits
from ditstream.engine.batching import BatchPolicy
from ditstream.engine.config import EngineConfig, StreamConfig
from ditstream.engine.errors import GenerationError, generation_failure, is_fatal_device_error
from ditstream.engine.limits import EngineLimits, check_input, ensure_valid
from ditstream.engine.loader import ModelComponents
from ditstream.engine.plan import Plan, Transition, decode_clean, encode_clean, make_plan, predict_x0
from ditstream.engine.prompt_cache import BatchConditioning, PromptSource
from ditstream.engine.queues import FrameInbox, OutputQueue
from ditstream.engine.similarity import SimilarityFilter
from ditstream.engine.stream import InFlight, StreamState, new_stream_id
from ditstream.engine.temporal import temporal_refusal
from ditstream.engine.types import Frame, StreamOutput

logger = logging.getLogger(__name__)


class EngineCore:
    """Stream-batched, cross-stream-batched SANA-Sprint sampling."""

    def __init__(self, components: ModelComponents, backend: Backend, prompts: PromptSource,
                 config: EngineConfig | None = None, clock: Callable[[], float] = time.perf_counter) -> None:
        self.components = components
        self.backend = backend
        self.prompts = prompts
        self.config = config or EngineConfig()
        self.streams: dict[str, StreamState] = {}
        #: Where the core reads the time (queue and output timings, the batch policy's observations).
        self.clock = clock
        #: Denoise calls made, by batch size (size → calls): at most ``max_batch`` keys, so it stays
        #: bounded for the life of the server (the ``ditstream_batch_size`` histogram is ``on_batch``'s).
        self.batch_sizes: Counter[int] = Counter()
        #: Called on the engine thread per denoise call with (samples, seconds); e.g. a metrics histogram.
        self.on_batch: Callable[[int, float], None] | None = None
        #: When ticks start (a pure policy, fed with what the ticks observe; ``engine.batching``).
        self.batching = BatchPolicy(self.config.batching)
        #: Failed model calls by stage (``encode``/``denoise``/``decode``; ``nonfinite`` counts samples
        #: failed for NaN/inf output, ``tick`` whole ticks failed by an error outside a model call).
        self.failed_calls: dict[str, int] = dict.fromkeys(("encode", "denoise", "decode", "nonfinite", "tick"), 0)
        #: Frames and jobs answered with an error instead of an image.
        self.failed_frames = 0
        #: Called on the engine thread per failure with (stage, frames failed); e.g. a metrics counter.
        self.on_failure: Callable[[str, int], None] | None = None
        #: Each denoise call's concatenated embeddings, rebuilt only when the call's plans change.
        self.conditioning = BatchConditioning()

    # ------------------------------------------------------------------ streams
    @property
    def size_multiple(self) -> int:
        return self.components.vae_scale_factor * int(self.components.transformer.config.patch_size)

    @property
    def limits(self) -> BackendLimits:
        """The backend's bounds of one call (batch and size profile)."""
        return self.backend.limits

    @property
    def max_batch(self) -> int:
        """Samples per model call: the configured bound, never more than the backend takes."""
        limit = self.limits.max_batch
        return min(self.config.max_batch, limit) if limit is not None else self.config.max_batch

    @property
    def engine_limits(self) -> EngineLimits:
        """What this core accepts: its config's bounds, size multiple, backend profile, loaded LoRA names."""
        loras = self.components.loras
        return EngineLimits(size_multiple=self.size_multiple, max_pixels=self.config.max_pixels,
                            max_prompt_chars=self.config.max_prompt_chars, profile=self.limits,
                            loras=tuple(sorted(loras)), max_batch=self.max_batch, inbox_depth=self.config.inbox_depth,
                            temporal_refusal=temporal_refusal(self.backend))

    def validate(self, cfg: StreamConfig) -> StreamConfig:
        """Trusts a config an edge validated; checks any other (a direct caller): one outside the limits
        would break the batched model call of every stream it shares a tick with."""
        return ensure_valid(cfg, self.engine_limits)

    def add(self, cfg: StreamConfig, *, stream_id: str | None = None, one_shot: bool = False,
            notify: Callable[[], None] | None = None) -> StreamState:
        cfg = self.validate(cfg)
        sid = stream_id or new_stream_id("job" if one_shot else "s")
        state = StreamState(
            id=sid, config=cfg, plan=self._plan(cfg),
            outputs=OutputQueue(self.config.output_queue_size, notify), filter=SimilarityFilter(cfg.filter, cfg.base_seed),
            one_shot=one_shot, inbox=FrameInbox(self.config.inbox_depth),
        )
        self.streams[sid] = state
        return state

    def _plan(self, cfg: StreamConfig) -> Plan | None:
        return make_plan(cfg, self.components, self.prompts)

    def reconfigure(self, stream_id: str, cfg: StreamConfig) -> StreamConfig:
        """New frames use ``cfg``; frames in flight finish with the plan they entered with.

        With ``cfg.transition_frames`` > 0 the next frames glide from where the stream is to ``cfg``.
        """
        state = self.streams[stream_id]
        cfg = self.validate(cfg)
        target = self._plan(cfg)
        state.transition = Transition.between(state.plan, target, cfg.transition_frames)
        if state.transition is None:
            state.plan = target
        state.filter.reconfigure(cfg.filter)
        temporal_stream.reconfigure(state, state.config, cfg, gliding=state.transition is not None)
        state.config = cfg
        return cfg

    def remove(self, stream_id: str) -> StreamState | None:
        """Forget a stream and everything it had in flight (cancelled work is simply dropped)."""
        state = self.streams.pop(stream_id, None)
        self.batching.forget(stream_id)
        if state is not None:
            state.outputs.close()
        return state

    def submit(self, stream_id: str, frame: Frame) -> bool:
        """Offer a frame (latest wins); returns True if it replaced an unprocessed one."""
        return offer(self.streams[stream_id], frame)

    def has_work(self) -> bool:
        return any(s.busy for s in self.streams.values())

    def batch_wait(self, now: float) -> float:
        """Seconds to hold the next tick for frames expected soon (0: start it now); see ``engine.batching``."""
        pending: dict[str, float] = {}
        idle: list[str] = []
        for sid, state in self.streams.items():
            frame = state.inbox.oldest()
            if frame is not None:
                pending[sid] = frame.received_at
            elif state.pipeline:  # latents in flight: ready since the last tick ended
                pending[sid] = self.batching.last_tick_end or now
            elif not state.one_shot:
                idle.append(sid)
        return self.batching.wait_s(now, pending, idle)

    # ------------------------------------------------------------------ tick
    @torch.inference_mode()
    def step(self) -> list[StreamOutput]:
        """Advance every stream by one stage; returns the outputs emitted (also queued per stream)."""
        start = self.clock()
        self._admit_new_frames()
        self._denoise_all()
        out = self._emit()
        self.batching.observe_tick(start, self.clock())
        return out

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
        now = self.clock()
        for state in self.streams.values():
            frame = state.inbox.take()
            if frame is None:
                continue
            self.batching.observe_arrival(state.id, frame.received_at)
            gliding = state.transition is not None
            if gliding:  # the stream moves one step along its transition with every new frame
                state.plan = state.transition.next_plan()
                if state.transition.finished:
                    state.transition = None
            plan = state.plan
            item = InFlight(frame=frame, plan=plan, x=None, taken_at=now)
            # While gliding the output changes even for a repeated input: the filter must not skip.
            if frame.image is not None and not gliding and state.filter.should_skip(frame.image):
                item.skipped = True
                item.stage = plan.steps  # travels without compute
            elif frame.image is None or plan.config.mode == "txt2img":
                item.x = sampler.entry_latent(plan.angles[:1], plan.noise[:1], c.sigma_data)
            else:
                if plan.config.feedback > 0 and _fits(state.last_latent, plan):
                    item.previous = state.last_latent
                to_encode[frame.image.shape[:2]].append(item)
            if not item.skipped:
                temporal_stream.admit(state, item)  # motion scale (read at encode below), memory link
            state.pipeline.append(item)
        for items in to_encode.values():
            for chunk in _chunks(items, self.max_batch):
                t0 = self.clock()
                try:
                    clean = encode_clean(self.backend, c, imgs.to_tensor([it.frame.image for it in chunk], c.device))
                except Exception as exc:
                    self._fail_call("encode", chunk, exc)
                    continue
                if any(it.previous is not None for it in chunk):
                    clean = sampler.feedback_blend(
                        clean, torch.cat([it.previous if it.previous is not None else clean[i : i + 1]
                                          for i, it in enumerate(chunk)]),
                        sampler.feedback_weights([it.plan.config.feedback * it.motion_scale if it.previous is not None
                                                  else 0.0 for it in chunk], clean.device))
                t1 = torch.cat([it.plan.angles[:1] for it in chunk])
                noise = torch.cat([it.plan.noise[:1] for it in chunk])
                x = sampler.entry_latent(t1, noise, c.sigma_data, clean)
                dt = self.clock() - t0
                for i, it in enumerate(chunk):  # a non-finite latent is caught at decode (see there)
                    it.inference_s += dt
                    it.x = x[i : i + 1]

    def _denoise_all(self) -> None:
        c = self.components
        groups: dict[tuple, list[InFlight]] = defaultdict(list)
        for state in self.streams.values():
            for it in state.pipeline:
                if it.x is not None and not it.done:
                    groups[(it.plan.latent_shape, it.plan.embeds.shape[1:], it.plan.loras)].append(it)
        finished: dict[tuple, list[InFlight]] = defaultdict(list)
        for key, items in groups.items():
            for chunk in _chunks(items, self.max_batch):
                t0 = self.clock()
                x = torch.cat([it.x for it in chunk])
                t = torch.stack([it.plan.angles[it.stage] for it in chunk])
                embeds, mask, guidance = self.conditioning.get([it.plan for it in chunk])
                try:
                    with temporal_stream.memory_call(self.backend, chunk):  # attention memory, if any row has it
                        x0 = predict_x0(self.backend, c, x, t, embeds, mask, guidance, key[2])
                except Exception as exc:
                    self._fail_call("denoise", chunk, exc)
                    continue
                # No finiteness check here: it would wait for the device once per call. A NaN/inf
                # sample stays in its own row (every layer is per-sample) through renoise and decode,
                # where the image is read back anyway and the check costs no extra wait.
                for i, it in enumerate(chunk):
                    it.stage += 1
                    if it.done:
                        it.x = x0[i : i + 1]
                        finished[key[0]].append(it)
                    else:
                        it.x = sampler.renoise(x0[i : i + 1], it.plan.angles[it.stage : it.stage + 1],
                                               it.plan.noise[it.stage : it.stage + 1], c.sigma_data)
                dt = self.clock() - t0
                self.batch_sizes[len(chunk)] += 1
                if self.on_batch is not None:
                    self.on_batch(len(chunk), dt)
                for it in chunk:
                    it.inference_s += dt
        for items in finished.values():
            for chunk in _chunks(items, self.max_batch):
                t0 = self.clock()
                try:
                    decoded = decode_clean(self.backend, c, torch.cat([it.x for it in chunk]))
                except Exception as exc:
                    self._fail_call("decode", chunk, exc)
                    continue
                bad = self._fail_nonfinite(chunk, decoded)
                arr = imgs.to_unit(decoded).numpy() if self.config.output_float else imgs.to_host_uint8(decoded)
                dt = self.clock() - t0
                for i, it in enumerate(chunk):
                    it.inference_s += dt
                    if i not in bad:
                        it.result = arr[i]
                        it.latent = it.x if it.plan.config.feedback > 0 else None
                        it.x = None

    def _emit(self) -> list[StreamOutput]:
        out: list[StreamOutput] = []
        now = self.clock()
        for state in list(self.streams.values()):
            while state.pipeline and state.pipeline[0].done:
                it = state.pipeline.popleft()
                if it.skipped and state.last_output is None:  # it repeats a frame that failed
                    it.fail(GenerationError("the frame this one repeats failed; nothing to re-send"))
                    self.failed_frames += 1
                if it.error is not None:
                    image = None
                    state.stats.failed += 1
                    state.filter.reset()  # the next frame is computed, not a repeat of an older output
                elif it.skipped:
                    image = state.last_output
                    state.stats.skipped += 1
                else:
                    image = it.result
                    state.last_output = image
                    state.last_latent = it.latent
                    state.stats.processed += 1
                f = it.frame
                output = StreamOutput(
                    stream_id=state.id, seq=f.seq, ts=f.ts, image=image, skipped=it.skipped, error=it.error,
                    timings={"queue": it.taken_at - f.received_at, "inference": it.inference_s,
                             "total": now - f.received_at},
                )
                before = state.outputs.dropped
                state.outputs.put(output)
                state.stats.dropped_outputs += state.outputs.dropped - before
                self.batching.observe_output(state.id, now)
                out.append(output)
        return out


    # ------------------------------------------------------------------ failures
    def _fail_call(self, stage: str, chunk: list[InFlight], exc: Exception) -> None:
        """A model call raised: fail its frames only (a fatal device error propagates instead)."""
        if is_fatal_device_error(exc):
            raise exc
        logger.warning("%s call of %d sample(s) failed; failing its frames only: %r", stage, len(chunk), exc,
                       exc_info=logger.isEnabledFor(logging.DEBUG))
        error = generation_failure(stage, exc)
        for it in chunk:
            it.fail(error)
        self._count_failure(stage, len(chunk))

    def _fail_nonfinite(self, chunk: list[InFlight], out: torch.Tensor) -> set[int]:
        """Fail the samples of ``out`` (B, ...) holding NaN/inf; returns their indices in ``chunk``.

        Run on decoded images only, which also catches a non-finite denoise output."""
        finite = torch.isfinite(out.reshape(out.shape[0], -1)).all(dim=1)
        if bool(finite.all()):
            return set()
        bad = {i for i, ok in enumerate(finite.tolist()) if not ok}
        logger.warning("decode produced non-finite values for %d of %d sample(s)", len(bad), len(chunk))
        for i in bad:
            chunk[i].fail(GenerationError("the model produced non-finite values (NaN/inf)"))
        self._count_failure("nonfinite", len(bad))
        return bad

    def fail_in_flight(self, exc: Exception) -> list[StreamOutput]:
        """An error outside any model call broke the tick: fail every frame in flight, emit them in order.

        Nothing stale is left behind: every pipeline is emptied (as errors), so the next tick starts clean.
        """
        error = generation_failure("tick", exc)
        n = 0
        for state in self.streams.values():
            for it in state.pipeline:
                if not it.done or (it.error is None and it.result is None and not it.skipped):
                    it.fail(error)
                    n += 1
        self._count_failure("tick", n)
        return self._emit()

    def _count_failure(self, stage: str, frames: int) -> None:
        self.failed_calls[stage] += 1
        self.failed_frames += frames
        if self.on_failure is not None:
            self.on_failure(stage, frames)


def _fits(latent: torch.Tensor | None, plan: Plan) -> bool:
    """Whether a fed-back latent can enter a frame of ``plan`` (same latent shape)."""
    return latent is not None and tuple(latent.shape[1:]) == plan.latent_shape


def _chunks(items: list[InFlight], size: int) -> Iterable[list[InFlight]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def offer(state: StreamState, frame: Frame) -> bool:
    """Put ``frame`` in the stream's inbox; True if it made an unprocessed frame drop (``FrameInbox``).

    The one way a frame enters a stream, and safe from any thread: it reads only the stream's
    current config (one reference) and writes only its inbox (a locked slot) and the input-drop
    counter (written by the submitting side alone); the core's tables are never touched, so a
    codec thread can offer frames while the engine thread adds or removes streams.
    """
    check_input(state.config, frame.image)
    if not frame.received_at:  # a core on another clock (a test's) gets frames stamped by its caller
        frame.received_at = time.perf_counter()
    dropped = state.inbox.put(frame)
    if dropped:
        state.stats.dropped_inputs += dropped
    return dropped > 0
