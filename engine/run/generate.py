"""Run one generation: load (and cache) the pipeline, apply the stack and the memory plan, denoise with
per-step reports and previews, decode (streaming chunks if asked), and write the MP4 atomically."""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from engine.models.catalog import HIGH, LOW, SINGLE, ModelSpec
from engine.models.detect import ModelInfo
from engine.port import (
    EventCallback, Memory, MemoryView, PlanView, Retry, StackApplied, StackReport, Status, Step, ValidatedRequest,
    VideoChunk,
)
from engine.port import Plan as PlanEvent
from engine.run.request import Resolved, refuse_unfit
from engine.types import GenerationCancelled, GenerationRequest, GenerationResult, RequestError, WanStackError

log = logging.getLogger(__name__)


class Generator:
    """Owns the cached pipeline and the LoRA merge session that belongs to it. One run at a time (the
    facade holds the lock). Runs only requests validated at the door (engine.port.ValidatedRequest)."""

    def __init__(self, settings, library):
        self.settings = settings
        self.library = library  # engine.lora.library.LoraLibrary, shared with the facade (parsed-file cache)
        self._cancel = threading.Event()
        self._pipe = None
        self._pipe_key: tuple | None = None
        self._i2v_pipe = None  # TI2V with a start image: the same components in the I2V pipeline
        self._session = None  # engine.lora.session.MergeSession of the loaded pipeline's experts
        self._w0_sources: dict[str, Any] = {}  # component -> WeightSource its LoRA W0 is re-read from (single files)
        self._device = None
        self._dtype = None
        self._offload: tuple | None = None  # (pipeline id, mode, vae_tiling, text_encoder_on_cpu, device) applied

    # ---- lifecycle ------------------------------------------------------------------------
    def cancel(self) -> None:
        self._cancel.set()

    def release(self) -> None:
        """Drop the pipeline and its merge session (which holds the experts' merge state)."""
        from engine.memory.recovery import release_memory

        if self._session is not None:
            self._session.close()
        self._session = None
        self._w0_sources = {}
        self._pipe = self._i2v_pipe = None
        self._pipe_key = None
        self._offload = None
        release_memory()

    def load(self, info: ModelInfo, spec: ModelSpec):
        """The pipeline for `info`, loaded once and cached until another model is asked for.

        A damaged model gives one RequestError naming the file and the fix, never a loader's traceback, and
        leaves nothing loaded: the next run (of a good model) loads as on a fresh start."""
        from engine.memory.recovery import is_out_of_memory
        from engine.models.load import check_weight_files

        key = (info.path, info.type)
        if self._pipe is not None and self._pipe_key == key:
            return self._pipe
        self.release()
        check_weight_files(info)  # truncated or garbage files, with both sizes, before a loader sees them
        try:
            return self._load(info, spec, key)
        except WanStackError:
            raise
        except (OSError, RuntimeError, ValueError, _safetensors_error()) as e:
            if is_out_of_memory(e):
                raise  # run_with_oom_recovery retries with a heavier plan
            log.debug("loading %s failed", info.path, exc_info=True)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:400]
            raise RequestError(f"model {info.id} could not be loaded from {info.path}: {first}; check its files "
                               "(download a damaged one again)") from e
        finally:
            if self._pipe_key != key:
                self.release()  # a half-built pipeline is not kept

    def _load(self, info: ModelInfo, spec: ModelSpec, key: tuple):
        import torch
        from diffusers import AutoencoderKLWan, DiffusionPipeline

        from engine.device import pick_device

        _quiet_loading()
        self._device, self._dtype = pick_device()
        if info.source != "diffusers":  # a recipe or a model assembled from --comfyui: single files
            from engine.models.load import build_pipeline

            loaded = build_pipeline(info, self._dtype)
            pipe = loaded.pipe
            # LoRA W0 is re-read from the single file, not copied (handed to the pipeline's merge session)
            self._w0_sources = dict(loaded.sources)
            pipe.set_progress_bar_config(disable=True)
            self._pipe, self._pipe_key = pipe, key
            return pipe
        # The Wan docs load the VAE in fp32 and the rest in bf16; on CPU everything is fp32.
        parts = {"vae": AutoencoderKLWan.from_pretrained(info.path, subfolder="vae", **_dtype_kw(torch.float32))}
        if (Path(info.path) / "image_encoder").is_dir():  # Wan2.1 I2V: the docs keep the CLIP encoder in fp32 too
            from transformers import CLIPVisionModel

            parts["image_encoder"] = CLIPVisionModel.from_pretrained(
                info.path, subfolder="image_encoder", dtype=torch.float32)
        pipe = DiffusionPipeline.from_pretrained(info.path, **parts, **_dtype_kw(self._dtype))
        from engine.models.load import own_aligned

        for name in ("transformer", "transformer_2", "text_encoder", "vae", "image_encoder"):
            if getattr(pipe, name, None) is not None:
                own_aligned(getattr(pipe, name))  # same memory layout as single-file loads: same frames
        pipe.set_progress_bar_config(disable=True)
        self._pipe, self._pipe_key = pipe, key
        return pipe

    @staticmethod
    def experts(pipe, spec: ModelSpec) -> dict:
        """Expert name -> transformer module, as the LoRA engine expects."""
        if spec.dual_expert:
            return {HIGH: pipe.transformer, LOW: pipe.transformer_2}
        return {SINGLE: pipe.transformer}

    # ---- one run ---------------------------------------------------------------------------
    def run(self, checked: ValidatedRequest, emit: EventCallback, out_path: str | Path | None = None,
            stream_video: bool = False) -> GenerationResult:
        """Run a validated request. With no `out_path` the video goes to the outputs folder, and a failed or
        stopped run leaves a record there (a settings JSON with its status) for the gallery."""
        from engine.memory.recovery import trim_heap

        try:
            return self._run(checked, emit, out_path, stream_video)
        except (WanStackError, RuntimeError, OSError) as e:
            if out_path is None:
                stopped = isinstance(e, GenerationCancelled)
                _write_failure(self.settings.outputs_dir, checked, "stopped" if stopped else "failed", str(e))
            raise
        finally:
            trim_heap()  # the frames and the encoder's buffers are freed by now

    def _run(self, checked: ValidatedRequest, emit: EventCallback, out_path, stream_video) -> GenerationResult:
        from engine import memory
        from engine.memory.recovery import release_memory

        info, spec, req, r = checked.model, checked.spec, checked.request, checked.resolved
        n_loras = checked.loras_per_expert
        snapshot = memory.snapshot()  # the memory plan is made against the memory of now, so here, not at the door
        reserve = req.vram_reserve_bytes or self.settings.vram_reserve_bytes
        dtype = None if snapshot.free_vram_bytes() is not None else "fp32"
        stored = dict(storage=info.storage or None, text_encoder_storage=_text_encoder_storage(info))
        plan = memory.plan_for(spec, r.height, r.width, r.frames, loras=n_loras, snapshot=snapshot,
                               choice=req.offload, reserve_bytes=reserve, dtype=dtype, **stored)
        if not (req.ignore_memory_plan or getattr(self.settings, "ignore_memory_plan", False)):
            refuse_unfit(plan, spec, r, n_loras, snapshot, req.offload, reserve, dtype, **stored)
        image = _load_image(req.image, r) if req.image else None
        if n_loras:
            memory.require_stack_transient(plan.workload, plan, snapshot)
        from engine.speed.run import RunSpeed

        speed = RunSpeed.for_request(req, r.steps, self.settings, plan)
        emit(PlanEvent(PlanView.from_plan(plan, speed=speed.plan.to_dict())))
        self._cancel.clear()
        started = time.perf_counter()
        notes: list[str] = []
        if stream_video:
            from engine.run.video import streaming_unavailable

            why = streaming_unavailable()
            if why:  # the player would fail on every segment; the finished MP4 is shown instead
                stream_video = False
                notes.append(why)
                emit(Status(why))
        state: dict[str, Any] = {}

        def on_retry(message: str) -> None:
            notes.append(message)
            emit(Retry(message))

        def attempt(current_plan):
            pipe = self.load(info, spec)
            _set_shift(pipe, r.shift)
            run_pipe = self._pipe_for(pipe, spec, image)
            if current_plan is not plan:  # a retry after an out-of-memory runs under a heavier plan
                emit(PlanEvent(PlanView.from_plan(current_plan, speed=speed.plan.to_dict())))
            state["loras"] = self._apply_loras_and_plan(run_pipe, spec, req, current_plan, emit, steps=r.steps)
            state["plan"] = current_plan
            speed.apply(list(self.experts(run_pipe, spec).values()), current_plan,
                        lambda _kind, text: emit(Status(str(text))), state["loras"])
            return self._denoise_and_decode(run_pipe, spec, req, r, image, emit, stream_video, speed)

        emit(Status(f"loading {info.id}"))
        try:
            with memory.MemoryWatch(lambda sample: emit(Memory(_memory_view(sample)))) as watch:
                frames = memory.run_with_oom_recovery(
                    attempt, plan, on_retry, context=f"{r.width}x{r.height}, {r.frames} frames, {n_loras} LoRA(s)")
        finally:
            release_memory()
        final_plan = state["plan"]
        lora_report = state["loras"]
        settings = _settings_json(info, spec, req, r, lora_report, final_plan.mode.value)
        path = Path(out_path) if out_path else _default_out(self.settings.outputs_dir, r.seed)
        from engine.run.video import write_mp4, write_sidecar

        write_mp4(frames, path, r.fps, settings)
        write_sidecar(path, settings)
        seconds = time.perf_counter() - started
        return GenerationResult(
            path=str(path), seed=r.seed, frames=len(frames), width=frames[0].shape[1], height=frames[0].shape[0],
            fps=r.fps, seconds=round(seconds, 3), offload=final_plan.mode.value, loras=lora_report,
            model_type=spec.type, steps=r.steps, notes=notes, settings=settings, plan=final_plan.to_dict(),
            peak_vram_bytes=watch.peak_vram_bytes, peak_ram_bytes=watch.peak_ram_bytes, speed=speed.report(),
        )

    def _pipe_for(self, pipe, spec: ModelSpec, image):
        if spec.task == "ti2v" and image is not None:
            if self._i2v_pipe is None:
                from diffusers import WanImageToVideoPipeline

                self._i2v_pipe = WanImageToVideoPipeline.from_pipe(pipe, torch_dtype=None)
                self._i2v_pipe.set_progress_bar_config(disable=True)
            return self._i2v_pipe
        return pipe

    def merge_session(self, pipe, spec: ModelSpec):
        """The merge session of this pipeline's experts: made on first use, closed with the pipeline."""
        from engine.lora.session import MergeSession

        from engine.models.catalog import EXPERT_COMPONENT

        experts = self.experts(pipe, spec)
        if self._session is None or not self._session.owns(experts):
            if self._session is not None:
                self._session.close()
            sources = {e: self._w0_sources[EXPERT_COMPONENT[e]] for e in experts
                       if EXPERT_COMPONENT[e] in self._w0_sources}
            self._session = MergeSession(self.library, experts, w0_sources=sources)
        return self._session

    def _apply_loras_and_plan(self, pipe, spec: ModelSpec, req: GenerationRequest, plan, emit,
                              steps: int | None = None) -> list[dict]:
        """Merge the request's stack into the experts and put the pipeline into the plan's offload mode.

        The merge is exact under every offload mode (it also updates the pinned CPU copies that group
        offloading with CUDA streams keeps), so the hooks stay in place across stack changes.
        """
        from engine.memory.offload import apply_plan

        if req.stack.entries:
            emit(Status(f"applying {sum(e.enabled for e in req.stack.entries)} LoRA(s)"))
        resolve = Path if self.settings.allow_lora_paths_outside else None
        # Scheduled weights (issue 11): the runtime path needs the run's steps and the expert split.
        from engine.lora.stack_runtime import high_noise_steps_of

        high_steps = high_noise_steps_of(pipe, spec.boundary_ratio, steps) if steps and spec.dual_expert else None
        report = self.merge_session(pipe, spec).apply(spec, req.stack, skip_failing=req.skip_failing_loras,
                                                      resolve=resolve, steps=steps, high_steps=high_steps)
        emit(StackApplied(StackReport.from_rows(report, spec.experts)))
        # Tracked here, not on the pipeline: TI2V's image pipeline shares its modules with the text one,
        # so the hooks belong to the modules, whichever pipeline object runs them.
        wanted = (id(pipe), plan.mode.value, plan.vae_tiling, bool(plan.text_encoder_on_cpu), plan.device)
        if self._offload != wanted:
            apply_plan(pipe, plan, _plan_device(plan))
            self._offload = wanted
        return report

    def step_end(self, step: int, total: int, expert: str, seconds: float, latents, emit: EventCallback,
                 speed=None) -> None:
        """Per-step hook point: runs after every denoising step (before the next one starts).

        Sets the scheduled LoRA strengths for the next step, closes the step for the speed tools, reports
        the step with a latent preview, then stops the run if the user asked. Per-step work goes here.
        """
        from engine.run.preview import latents_to_gif

        if self._session is not None:
            self._session.set_step(step, total)  # scheduled LoRA weights for the next step (issue 11)
        if speed is not None:
            speed.end_step()
        emit(Step(step=step, total=total, seconds=round(seconds, 4), expert=expert, preview_gif=latents_to_gif(latents)))
        if self._cancel.is_set():
            raise GenerationCancelled(f"stopped after step {step} of {total}")

    def _denoise_and_decode(self, pipe, spec, req, r: Resolved, image, emit, stream_video, speed=None):
        import torch

        boundary = (spec.boundary_ratio or 0) * pipe.scheduler.config.num_train_timesteps
        last = [time.perf_counter()]

        def on_step(p, i, t, kwargs):
            now = time.perf_counter()
            expert = SINGLE if not spec.dual_expert else (HIGH if float(t) >= boundary else LOW)
            self.step_end(i + 1, r.steps, expert, now - last[0], kwargs["latents"], emit, speed)
            last[0] = time.perf_counter()
            return {}

        args: dict[str, Any] = dict(
            prompt=req.prompt, negative_prompt=req.negative_prompt or None, height=r.height, width=r.width,
            num_frames=r.frames, num_inference_steps=r.steps, guidance_scale=r.guidance,
            generator=torch.Generator(device="cpu").manual_seed(r.seed), output_type="latent",
            callback_on_step_end=on_step, callback_on_step_end_tensor_inputs=["latents"],
        )
        if spec.dual_expert:
            args["guidance_scale_2"] = r.guidance_2
        if image is not None:
            args["image"] = image
        emit(Status("denoising"))
        with speed.caching(list(self.experts(pipe, spec).values())) if speed else contextlib.nullcontext():
            latents = pipe(**args).frames
        if self._cancel.is_set():
            raise GenerationCancelled(f"stopped after the last step of {r.steps}")
        emit(Status("decoding"))
        on_chunk = self._segment_writer(r.fps, emit) if stream_video else None
        return decode(pipe, latents, on_chunk=on_chunk)

    def _segment_writer(self, fps: int, emit: EventCallback):
        """Each decoded chunk becomes an MPEG-TS segment in outputs/.stream/, announced as a VideoChunk."""
        from engine.run.video import write_mp4

        folder = Path(self.settings.outputs_dir) / ".stream" / datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        count = [0]

        def on_chunk(frames: list) -> None:
            path = write_mp4(frames, folder / f"segment-{count[0]:04d}.ts", fps, container="mpegts")
            count[0] += 1
            emit(VideoChunk(str(path)))

        return on_chunk


def _memory_view(sample) -> MemoryView:
    """engine.memory.MemorySample -> the door's MemoryView."""
    return MemoryView(vram_used_bytes=sample.vram_used_bytes, vram_total_bytes=sample.vram_total_bytes,
                      ram_used_bytes=sample.ram_used_bytes, ram_total_bytes=sample.ram_total_bytes,
                      peak_vram_bytes=sample.peak_vram_bytes, peak_ram_bytes=sample.peak_ram_bytes)


def _write_failure(outputs_dir, checked: ValidatedRequest, status: str, message: str) -> None:
    """A failed or stopped run's settings with its status, as outputs/<stamp>-<seed>.json (no video)."""
    from engine.run.video import write_sidecar

    r = checked.resolved
    settings = _settings_json(checked.model, checked.spec, checked.request, r, None, checked.request.offload)
    settings.update(status=status, message=message)
    try:
        Path(outputs_dir).mkdir(parents=True, exist_ok=True)
        write_sidecar(_default_out(outputs_dir, r.seed), settings)
    except OSError as e:  # the run's own error is what the user needs to see
        log.warning("could not record the %s run in %s: %s", status, outputs_dir, e)


def decode(pipe, latents, on_chunk: Callable[[list], None] | None = None) -> list:
    """Latents -> list of HxWx3 uint8 frames, as the Wan pipelines decode them.

    With `on_chunk`, frames are also handed over as the VAE produces them: the Wan VAE decodes one
    latent frame per call of `vae.decoder` (1 then 4 video frames), so a forward hook on it sees each
    chunk as soon as it exists. Under VAE tiling the decoder runs per tile, so chunks are not streamed.
    """
    import torch

    vae = pipe.vae
    z = latents.to(dtype=vae.dtype)
    mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1).to(z.device, z.dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1).to(z.device, z.dtype)
    z = z / inv_std + mean
    handle = None
    if on_chunk is not None and not getattr(vae, "use_tiling", False):
        def hook(module, inputs, output):
            x = output
            if vae.config.patch_size is not None:
                from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

                x = unpatchify(x, patch_size=vae.config.patch_size)
            on_chunk(_to_uint8(x.clamp(-1, 1)))

        handle = vae.decoder.register_forward_hook(hook)
    try:
        with torch.no_grad():
            video = vae.decode(z, return_dict=False)[0]
    finally:
        if handle is not None:
            handle.remove()
    return _to_uint8(video)


def _to_uint8(video) -> list:
    """[B, 3, T, H, W] in [-1, 1] -> T frames of HxWx3 uint8 (first batch item)."""
    import torch

    x = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return list(x.permute(1, 2, 3, 0).cpu().numpy())


def _plan_device(plan):
    import torch

    return torch.device("cuda" if plan.device == "cuda" else "cpu")


def _text_encoder_storage(info: ModelInfo) -> str | None:
    """The text encoder file's storage for the memory estimate (an fp8 file stays fp8 in memory); None for a
    transformers folder, which is cast to the compute dtype at load."""
    from engine.models.identify import file_storage

    path = (info.files or {}).get("text_encoder")
    return (file_storage(path) or None) if path else None


def _dtype_kw(dtype) -> dict:
    """diffusers 0.42 renamed `torch_dtype` to `dtype`; older releases only know `torch_dtype`."""
    import diffusers
    from packaging.version import Version

    return {"dtype" if Version(diffusers.__version__) >= Version("0.42") else "torch_dtype": dtype}


def _safetensors_error() -> type:
    """safetensors' own error (an Exception, not an OSError), raised by its readers on a damaged file."""
    from safetensors import SafetensorError

    return SafetensorError


def _quiet_loading() -> None:
    """Loading progress bars go to a terminal nobody watches; the UI reports status instead."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


def _set_shift(pipe, shift: float) -> None:
    config = pipe.scheduler.config
    key = "flow_shift" if "flow_shift" in config else "shift" if "shift" in config else None
    if key and float(config[key]) != shift:
        pipe.scheduler = type(pipe.scheduler).from_config(config, **{key: shift})


def _load_image(path: str, r: Resolved):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB").resize((r.width, r.height), Image.LANCZOS)
    except FileNotFoundError:
        raise RequestError(f"image {path} does not exist; pick an existing PNG or JPEG") from None
    except (UnidentifiedImageError, OSError) as e:
        raise RequestError(f"image {path} could not be read ({e}); use a PNG or JPEG") from None


def _default_out(outputs_dir, seed: int) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(outputs_dir) / f"{stamp}-{seed}.mp4"
    n = 1
    while out.exists():
        out = Path(outputs_dir) / f"{stamp}-{seed}-{n}.mp4"
        n += 1
    return out


def _settings_json(info, spec, req, r: Resolved, lora_report, offload_mode) -> dict:
    stack = []
    for e, rep in zip(req.stack.entries, lora_report or [{}] * len(req.stack.entries)):
        row = e.to_dict()
        if rep.get("sha256"):
            row["sha256"] = rep["sha256"]
        row["status"] = rep.get("status", "applied" if lora_report else "not applied")
        stack.append(row)
    return {
        "app": "WanStack", "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model": info.id, "model_type": spec.type, "prompt": req.prompt, "negative_prompt": req.negative_prompt,
        "image": Path(req.image).name if req.image else None, "seed": r.seed, "steps": r.steps,
        "width": r.width, "height": r.height, "frames": r.frames, "fps": r.fps, "guidance": r.guidance,
        "guidance_2": r.guidance_2, "shift": r.shift, "offload": offload_mode, "stack": stack, "status": "done",
    }
