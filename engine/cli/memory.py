"""`vram` and `plan` commands (memory governor)."""
from __future__ import annotations

from engine.dtypes import CAST_CHOICES
from engine.types import OFFLOAD_CHOICES, RequestError


def register(sub) -> None:
    p = sub.add_parser("vram", help="GPU memory (NVML) and system RAM now")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_vram)

    p = sub.add_parser("plan", help="estimate a run's memory and choose the offload mode")
    p.add_argument("--model-type", required=True, help="e.g. wan2.2-t2v-a14b")
    p.add_argument("--height", type=int, help="pixels (default: the model's)")
    p.add_argument("--width", type=int, help="pixels (default: the model's)")
    p.add_argument("--frames", type=int, help="frames (default: the model's)")
    p.add_argument("--loras", type=int, default=0, metavar="N", help="enabled LoRAs in the stack")
    p.add_argument("--free-vram", metavar="SIZE", help="plan for this much free VRAM instead of this machine's, e.g. 16GiB")
    p.add_argument("--ram", metavar="SIZE", help="plan for this much available system RAM, e.g. 64GiB")
    p.add_argument("--reserve", metavar="SIZE", default="1GiB", help="VRAM kept free for other apps (default 1GiB)")
    p.add_argument("--offload", default="auto", choices=OFFLOAD_CHOICES)
    p.add_argument("--dtype", default="bf16", choices=CAST_CHOICES, help="weights dtype on the GPU")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's; the step cache needs 10+)")
    p.add_argument("--cache", default="off", help="step cache: off or first_block")
    from engine.cli.core import add_speed_arguments

    add_speed_arguments(p)
    p.add_argument("--storage", help="transformer storage kept in memory: fp8_scaled, fp8_e4m3fn, gguf-Q8_0, gguf-Q4_K, ...")
    p.add_argument("--text-encoder-storage", help="the umt5 text encoder file's storage: fp8_scaled or fp8_e4m3fn "
                                                  "keep its Linear weights fp8; default: the compute dtype")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)


def cmd_vram(args):
    from engine.memory import MemorySnapshot, gib

    snap = MemorySnapshot.capture()
    if args.json:
        return snap.to_dict()
    lines = []
    if not snap.available:
        lines.append(f"GPU: unavailable, {snap.reason}")
    for g in snap.gpus:
        if g.error:
            lines.append(f"GPU {g.index}: {g.error}")
            continue
        cuda = f"cuda:{g.torch_index}" if g.torch_index is not None else "not visible to this process"
        util = f"{g.utilization_percent}%" if g.utilization_percent is not None else "n/a"
        temp = f"{g.temperature_c} C" if g.temperature_c is not None else "n/a"
        lines.append(f"GPU {g.index} ({cuda}) {g.name}: {gib(g.free_bytes)} free of {gib(g.total_bytes)}, "
                     f"utilisation {util}, temperature {temp}")
    lines.append(f"RAM: {gib(snap.ram_available_bytes)} available of {gib(snap.ram_total_bytes)}; "
                 f"this process {gib(snap.process_rss_bytes)}")
    return "\n".join(lines)


def cmd_plan(args):
    from engine.models.catalog import get_spec
    from engine.memory import MemorySnapshot, Workload, choose_offload, gib, parse_bytes

    from engine.run.request import check_geometry

    spec = get_spec(args.model_type)
    width, height, frames = check_geometry(spec, args.width, args.height, args.frames, flag="--")
    if args.loras < 0:
        raise RequestError(f"--loras {args.loras} must be 0 or more")
    reserve = parse_bytes(args.reserve, "--reserve")
    ram = parse_bytes(args.ram, "--ram") if args.ram else None
    if args.free_vram:
        snap = MemorySnapshot.planned(parse_bytes(args.free_vram, "--free-vram"), ram,
                                      base=None if ram is not None else MemorySnapshot.capture())
    else:
        snap = MemorySnapshot.planned(None, ram, base=MemorySnapshot.capture())
    from engine.memory.estimate import STORAGE_BYTES_PER_PARAM

    if args.storage and args.storage not in STORAGE_BYTES_PER_PARAM and args.storage not in ("fp32", "bf16", "fp16"):
        raise RequestError(f"--storage {args.storage!r} is not one of fp32, bf16, fp16, {', '.join(STORAGE_BYTES_PER_PARAM)}")
    te = args.text_encoder_storage
    if te and te not in ("fp8_scaled", "fp8_e4m3fn", "fp32", "bf16", "fp16"):
        raise RequestError(f"--text-encoder-storage {te!r} is not one of fp8_scaled, fp8_e4m3fn, fp32, bf16, fp16")
    work = Workload(spec, height, width, frames, loras=args.loras, dtype=args.dtype, storage=args.storage,
                    text_encoder_storage=te)
    plan = choose_offload(snap, work, args.offload, reserve)
    result = plan.to_dict()
    result.update(model_type=spec.type, height=height, width=width, frames=frames, loras=args.loras)
    result["speed"] = _speed_plan(args, spec, plan)
    if args.json:
        return result
    est = plan.estimate_bytes
    parts = ", ".join(f"{k} {gib(v)}" for k, v in est["phases"].items())
    return "\n".join([f"{spec.type} {width}x{height}x{frames}: {plan.label}"
                      f"{'' if plan.fits else ' (does not fit)'}, peak {gib(est['peak'])} ({parts})"]
                     + [f"- {r}" for r in plan.reasons] + [f"- {r}" for r in result["speed"]["reasons"]])


def _speed_plan(args, spec, plan) -> dict:
    """Attention, compile and step cache for this plan, on this machine's GPU (or a GPU you plan for)."""
    from engine.speed.attention import DeviceInfo, usable_backends
    from engine.speed.compile import toolchain_problem
    from engine.speed.options import SpeedOptions
    from engine.speed.plan import plan_speed

    options = SpeedOptions(attention=args.attention, compile=args.compile, cache=args.cache)
    device = DeviceInfo("cpu")
    if plan.device == "cuda":
        import torch

        device = DeviceInfo.capture("cuda") if torch.cuda.is_available() else DeviceInfo("cuda", None, "the planned GPU")
    steps = args.steps or spec.steps
    return plan_speed(options, device, steps, plan.mode.value, usable=usable_backends(),
                      toolchain=toolchain_problem(device.type)).to_dict()
