"""One generation as one streaming event: the engine runs in a worker thread, its typed events arrive on
a queue, and this module turns them into updates of the run panel (progress, preview, report, plan,
gauge, streamed video), ending with the result or the one failure."""
from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Iterator

from engine.port import Done, Event, Failed, Memory, Plan, Retry, StackApplied, Status, Step, ValidatedRequest, VideoChunk
from engine.types import GenerationRequest, GenerationResult
from ui import run_view as rv
from ui.context import UIContext

log = logging.getLogger(__name__)


def build_request(ctx: UIContext, model_id: str, prompt: str, negative: str, image: str | None, width, height,
                  frames, steps, seed, stack, fps=None, guidance=None, guidance_2=None, shift=None,
                  speed=None) -> ValidatedRequest:
    """The engine request from the page's values, validated at the engine's door (RequestError if not)."""
    spec = ctx.spec_for(model_id)

    def num(value, cast):
        return None if value is None or value == "" else cast(value)

    request = GenerationRequest(
        model=model_id, prompt=prompt or "", negative_prompt=negative or "", image=image or None,
        width=num(width, int), height=num(height, int), frames=num(frames, int), fps=num(fps, int),
        steps=num(steps, int), guidance=num(guidance, float),
        guidance_2=num(guidance_2, float) if spec.dual_expert else None,
        seed=None if seed is None or seed == "" or int(seed) < 0 else int(seed), shift=num(shift, float), stack=stack,
        offload=ctx.engine.offload, speed=speed,
    )
    return ctx.engine.validate(request)


class Run:
    """Runs engine.generate in a thread; its events go onto a queue."""

    def __init__(self, ctx: UIContext, request: ValidatedRequest, stream_video: bool = False):
        self.ctx = ctx
        self.events: queue.Queue = queue.Queue()
        self.outcome: Done | Failed | None = None
        self.finished = threading.Event()  # set as soon as the engine returns, before the queue drains
        self._thread = threading.Thread(target=self._work, args=(request, stream_video), daemon=True,
                                        name="wanstack-run")
        self._thread.start()

    def _work(self, request, stream_video):
        try:
            self.ctx.engine.generate(request, self._on_event, stream_video=stream_video)
        except Exception as e:  # the engine reported it as Failed already; keep the thread quiet
            log.debug("run ended with %s", e)
            if self.outcome is None:
                self.outcome = Failed(f"{type(e).__name__}: {e}")
        finally:
            self.finished.set()
            self.events.put(None)

    def _on_event(self, event: Event) -> None:
        if isinstance(event, (Done, Failed)):
            self.outcome = event
        else:
            self.events.put(event)

    def step_pending(self) -> bool:
        """A newer step is already waiting: its preview supersedes the current one."""
        with self.events.mutex:
            return any(isinstance(e, Step) for e in self.events.queue)

    def more_soon(self, seconds: float) -> bool:
        """Whether another event is queued now or arrives within `seconds`."""
        # not_empty shares the queue's (non-reentrant) mutex, so the predicate reads the deque directly
        with self.events.not_empty:
            return self.events.not_empty.wait_for(lambda: len(self.events.queue) > 0, timeout=seconds)

    def __iter__(self) -> Iterator[Event]:
        while True:
            event = self.events.get()
            if event is None:
                return
            yield event


def run_events(ctx: UIContext, request: ValidatedRequest, stream_video: bool = True):
    """Drive one run: ('update', {part: value}) as events arrive, then ('result', GenerationResult) or
    ('failed', Failed). Parts: progress, preview, report, plan, gauge, chunk."""
    run = Run(ctx, request, stream_video=stream_video)
    try:
        yield from _drive(run)
    finally:
        if not run.finished.is_set():  # the page went away or the handler was cancelled: stop the engine too
            ctx.engine.cancel()


# Engine events that come in a burst (plan, status, gauge, stack report before the first step) are merged
# into one page update: every update is a full round trip through Gradio, which costs far more than the
# engine needs to reach its first step.
COALESCE_SECONDS = 0.02


def _drive(run: Run):
    last_sample = None
    step_seconds: list[float] = []
    pending: dict[str, Any] = {}
    fraction = 0.0
    for event in run:
        if isinstance(event, Status):
            pending["progress"] = rv.progress_html(event.text, fraction if step_seconds else None, "running")
        elif isinstance(event, StackApplied):
            pending["report"] = rv.report_markdown(event.report)
        elif isinstance(event, Plan):
            pending["plan"] = rv.plan_markdown(event.plan)
        elif isinstance(event, Retry):
            pending["progress"] = rv.progress_html(f"⚠ {event.message}", None, "running")
        elif isinstance(event, Memory):
            last_sample = event.sample
            pending["gauge"] = rv.gauge_html(event.sample)
        elif isinstance(event, VideoChunk) and not run.finished.is_set():
            # Each streamed segment costs Gradio an ffmpeg mux; once the MP4 exists, showing it beats
            # catching the player up on segments.
            if "chunk" in pending:  # one segment per update: the streaming player takes them one by one
                yield "update", pending
                pending = {}
            pending["chunk"] = event.path
        elif isinstance(event, Step):
            step_seconds.append(event.seconds)
            recent = step_seconds[-5:] if len(step_seconds) < 2 else step_seconds[1:][-5:]  # step 1 carries encoding
            eta = sum(recent) / len(recent) * (event.total - event.step)
            fraction = event.step / event.total
            text, detail = rv.step_text(event.step, event.total, event.seconds, eta, event.expert)
            pending["progress"] = rv.progress_html(text, fraction, "running", detail)
            if not run.step_pending():  # when the page lags behind the engine, only the newest preview is drawn
                pending["preview"] = rv.preview_html(event.preview_gif, event.step, event.total)
        if pending and (isinstance(event, Step) or not run.more_soon(COALESCE_SECONDS)):
            yield "update", pending
            pending = {}
    if pending:
        yield "update", pending
    if last_sample is not None:
        yield "update", {"gauge": rv.gauge_html(last_sample, final=True)}
    outcome = run.outcome
    if isinstance(outcome, Done):
        yield "result", outcome.result
    else:
        yield "failed", outcome if outcome is not None else Failed("the run ended without a result")


def summary_of(result: GenerationResult) -> dict:
    return {
        "path": result.path, "seed": result.seed, "frames": result.frames, "width": result.width,
        "height": result.height, "fps": result.fps, "seconds": result.seconds, "offload": result.offload,
        "model_type": result.model_type, "steps": result.steps, "loras": result.loras, "notes": result.notes,
    }


def done_text(result: GenerationResult, wall_s: float) -> str:
    return (f"✓ Done in {wall_s:.1f} s · seed {result.seed} · {result.frames} frames {result.width}×{result.height} "
            f"@ {result.fps} fps · offload {result.offload}")


def wall_clock() -> float:
    return time.perf_counter()
