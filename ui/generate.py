"""One generation as one streaming event: status, stack report, memory plan, per-step previews, decoded
chunks, final video, gauge and history. The engine runs in a worker thread; its events arrive on a queue."""
from __future__ import annotations

import base64
import inspect
import io
import logging
import queue
import threading
import time
from typing import Any, Iterator

from engine.types import GenerationRequest, GenerationResult
from ui.context import UIContext
from ui.stack_logic import count_text

log = logging.getLogger(__name__)
GIB = 1 << 30


def build_request(ctx: UIContext, model_id: str, prompt: str, negative: str, image: str | None, width, height,
                  frames, steps, seed, stack, fps=None, guidance=None, guidance_2=None, shift=None,
                  warn=None) -> GenerationRequest:
    """Check every client-supplied name against the server's lists and build the engine request.
    `warn(text)` receives the engine's stack warnings (the UI shows them as toasts)."""
    info = ctx.model(model_id)  # RequestError if not one of ours
    spec = ctx.engine.spec(info.type)
    for warning in ctx.check_stack(spec, stack):
        log.info("stack warning: %s", warning)
        if warn is not None:
            warn(warning)

    def num(value, cast):
        return None if value is None or value == "" else cast(value)

    return GenerationRequest(
        model=info.id, prompt=prompt or "", negative_prompt=negative or "", image=image or None,
        width=num(width, int), height=num(height, int), frames=num(frames, int), fps=num(fps, int),
        steps=num(steps, int), guidance=num(guidance, float),
        guidance_2=num(guidance_2, float) if spec.dual_expert else None,
        seed=None if seed is None or int(seed) < 0 else int(seed), shift=num(shift, float), stack=stack,
        offload=ctx.settings.offload,
    )


class Run:
    """Runs engine.generate in a thread and turns its callbacks into a queue of (kind, payload)."""

    def __init__(self, ctx: UIContext, request: GenerationRequest, stream_video: bool = False):
        self.ctx = ctx
        self.events: queue.Queue = queue.Queue()
        self.result: GenerationResult | None = None
        self.error: BaseException | None = None
        self.finished = threading.Event()  # set as soon as the engine returns, before the queue drains
        kwargs = {}
        if stream_video and "stream_video" in inspect.signature(ctx.engine.generate).parameters:
            kwargs["stream_video"] = True
        self._thread = threading.Thread(target=self._work, args=(request, kwargs), daemon=True, name="wanstack-run")
        self._thread.start()

    def _work(self, request, kwargs):
        try:
            self.result = self.ctx.engine.generate(request, lambda kind, payload: self.events.put((kind, payload)), **kwargs)
        except BaseException as e:  # handed to the UI thread, which reports it
            self.error = e
        finally:
            self.finished.set()
            self.events.put(("done", None))

    def step_pending(self) -> bool:
        """A newer step is already waiting: its preview supersedes the current one."""
        with self.events.mutex:
            return any(kind == "step" for kind, _ in self.events.queue)

    def more_soon(self, seconds: float) -> bool:
        """Whether another event is queued now or arrives within `seconds`."""
        # not_empty shares the queue's (non-reentrant) mutex, so the predicate reads the deque directly
        with self.events.not_empty:
            return self.events.not_empty.wait_for(lambda: len(self.events.queue) > 0, timeout=seconds)

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        while True:
            kind, payload = self.events.get()
            if kind == "done":
                return
            yield kind, payload


def preview_animation(frames, step: int, total: int) -> str:
    """Latent preview frames (PIL images) as an inline looping GIF in an <img>.

    Inline (a data URL) rather than a file: no copy into Gradio's cache and no second request, so
    the preview lands with the step's update.
    """
    if frames is None:
        return ""
    if not isinstance(frames, (list, tuple)):
        frames = [frames]
    if not frames:
        return ""
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=list(frames[1:]), duration=150, loop=0)
    data = base64.b64encode(buf.getvalue()).decode()
    return (f"<div class='preview-box'><img alt='latent preview, step {step} of {total}' "
            f"src='data:image/gif;base64,{data}'><span>latents · step {step}/{total}</span></div>")


def format_report(loras: list[dict] | None) -> str:
    if loras is None:
        return ""
    if not loras:
        return "**Stack:** no LoRAs"
    lines = ["**Stack applied:**"]
    for r in loras:
        cov = r.get("coverage")
        if isinstance(cov, dict):
            cov = count_text(cov, "applied")
        experts = r.get("experts")
        experts = f" on {', '.join(experts)}" if experts else ""
        warn = "; ".join(r.get("warnings") or [])
        lines.append(f"- `{r.get('file')}`: {r.get('status', '?')}{experts}{' · ' + str(cov) if cov else ''}"
                     f"{' · ⚠ ' + warn if warn else ''}")
    return "\n".join(lines)


def format_plan(plan: dict | None) -> str:
    if not plan:
        return ""
    est = plan.get("estimate_bytes") or {}
    peak = est.get("peak") if isinstance(est, dict) else est
    text = f"**Memory plan:** offload `{plan.get('mode', '?')}`, VAE tiling {'on' if plan.get('vae_tiling') else 'off'}"
    if peak:
        text += f", peak estimate {peak / GIB:.2f} GiB"
    if plan.get("fits") is False:
        text += " · ⚠ may not fit"
    reasons = plan.get("reasons") or []
    if reasons:
        text += "<br>" + " ".join(str(r) for r in reasons)
    return text


def format_gauge(sample: dict | None, final: bool = False) -> str:
    """VRAM/RAM gauge from a 'memory' event sample (or an engine.vram() snapshot)."""
    if not sample:
        return ""
    parts = []
    if sample.get("vram_used_bytes") is None:
        reason = str(sample.get("reason") or "NVML gave no figures").replace("'", "&#39;").replace('"', "&quot;")
        parts.append(f"<span title='{reason}'>VRAM: not available (hover for why)</span>")
    for key, label, peak_key, peak_label in (("vram", "VRAM", "peak_vram_bytes", "peak"),
                                             ("ram", "RAM", "peak_ram_bytes", "app peak")):
        used, total = sample.get(f"{key}_used_bytes"), sample.get(f"{key}_total_bytes")
        if used is None:
            continue
        pct = 100 * used / total if total else 0
        bar = f"<span class='gauge'><span style='width:{pct:.0f}%'></span></span>" if total else ""
        text = f"{label} {bar} {used / GIB:.2f}" + (f" / {total / GIB:.1f}" if total else "") + " GiB"
        if sample.get(peak_key):
            text += f" ({peak_label} {sample[peak_key] / GIB:.2f})"
        parts.append(text)
    prefix = "<b>after the run</b> · " if final else ""
    return prefix + " &nbsp; ".join(parts)


def sample_from_snapshot(snap: dict | None) -> dict | None:
    """engine.vram() snapshot -> the 'memory' event's sample shape, for the idle gauge."""
    if not snap:
        return None
    gpu = (snap.get("gpus") or [{}])[0]
    as_int = (lambda v: v if isinstance(v, int) else None)
    total, avail = snap.get("ram_total_bytes"), snap.get("ram_available_bytes")
    return {
        "vram_used_bytes": as_int(gpu.get("used_bytes")), "vram_total_bytes": as_int(gpu.get("total_bytes")),
        "ram_used_bytes": total - avail if total and avail is not None else None, "ram_total_bytes": total,
        "reason": snap.get("reason"),
    }


def summary_of(result: GenerationResult) -> dict:
    return {
        "path": result.path, "seed": result.seed, "frames": result.frames, "width": result.width,
        "height": result.height, "fps": result.fps, "seconds": result.seconds, "offload": result.offload,
        "model_type": result.model_type, "steps": result.steps, "loras": result.loras, "notes": result.notes,
    }


def run_events(ctx: UIContext, request: GenerationRequest, progress=None, stream_video: bool = True):
    """Drive one run, yielding ('update', dict-of-fields) as events arrive and finally ('result', result)."""
    run = Run(ctx, request, stream_video=stream_video)
    try:
        yield from _drive(run, progress)
    finally:
        if not run.finished.is_set():  # the page went away or the handler was cancelled: stop the engine too
            ctx.engine.cancel()


# Engine events that come in a burst (plan, status, gauge, stack report before the first step) are merged
# into one page update: every update is a full round trip through Gradio, which costs far more than the
# engine needs to reach its first step.
COALESCE_SECONDS = 0.02


def _drive(run: Run, progress=None):
    last_sample: dict | None = None
    started = time.perf_counter()
    step_seconds: list[float] = []
    pending: dict[str, Any] = {}
    for kind, payload in run:
        if kind == "status":
            pending["status"] = str(payload)
        elif kind == "loras":
            pending["report"] = format_report(payload)
        elif kind == "plan":
            pending["plan"] = format_plan(payload)
        elif kind == "retry":
            pending["status"] = f"⚠ {payload}"
        elif kind == "memory":
            last_sample = payload
            pending["gauge"] = format_gauge(payload)
        elif kind == "video_chunk" and isinstance(payload, str) and not run.finished.is_set():
            # Each streamed segment costs Gradio an ffmpeg mux; once the MP4 exists, showing it beats
            # catching the player up on segments.
            if "chunk" in pending:  # one segment per update: the streaming player takes them one by one
                yield "update", pending
                pending = {}
            pending["chunk"] = payload
        elif kind == "step":
            step_seconds.append(payload.seconds)
            mean = sum(step_seconds[-5:]) / len(step_seconds[-5:])
            eta = mean * (payload.total - payload.step)
            text = (f"step {payload.step}/{payload.total} · {payload.seconds:.2f} s/step · ETA {eta:.1f} s"
                    f" · {payload.expert.replace('_', '-')}")
            if progress is not None:
                progress((payload.step, payload.total), desc=text, unit="steps")
            pending["status"] = text
            if not run.step_pending():  # when the page lags behind the engine, only the newest preview is drawn
                pending["preview"] = preview_animation(payload.preview, payload.step, payload.total)
        if pending and (kind == "step" or not run.more_soon(COALESCE_SECONDS)):
            yield "update", pending
            pending = {}
    if pending:
        yield "update", pending
    if run.error is not None:
        raise run.error
    run.result.notes = list(run.result.notes) + [f"wall time {time.perf_counter() - started:.2f} s"]
    if last_sample:
        yield "update", {"gauge": format_gauge(last_sample, final=True)}
    yield "result", run.result


def request_for_history(request: GenerationRequest, resolution: str | None) -> dict:
    d = {
        "model": request.model, "prompt": request.prompt, "negative_prompt": request.negative_prompt,
        "resolution": resolution, "frames": request.frames, "fps": request.fps, "steps": request.steps,
        "guidance": request.guidance, "guidance_2": request.guidance_2, "shift": request.shift,
        "stack": request.stack.to_list(),
    }
    return d

