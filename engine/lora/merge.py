"""Exact merged application of LoRA patches into a module's weights, in place.

For every touched parameter `W = W0 + sum_i w_i * scale_i * (B_i @ A_i) (+ full diffs)`, computed
from `W0` in stack order with fp32 accumulation (all ranks of a layer concatenated into one GEMM),
on the device where the weight lives, and written into `param.data` in place so offload hooks
that move `.data` between devices keep working.

`W0` is never a whole-model copy: it is re-read from the model's own safetensors files when the
module came from one (checked against the live weight at first touch), or else a copy of just the
touched parameter is kept. Removing a patch writes `W0` back, bit for bit.
"""
from __future__ import annotations

import json
import logging
import math
import mmap
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.lora.files import _ST_DTYPES, pread_into
from engine.types import RequestError, WanStackError

log = logging.getLogger(__name__)

CHUNK_BYTES = 16 << 20  # fp32 rows computed at once: bounds scratch memory; fewer, larger ops than 4 MiB run faster on a busy CPU


class WeightSource:
    """Reads single tensors (or row ranges) of a model folder's safetensors files, never the whole model.

    Plain reads use pread into a fresh buffer. Streamed reads during a merge (`scratch` given) are
    zero-copy views of a private read-only mapping of the file; each range's pages are dropped from
    the process (MADV_DONTNEED) when the next range is read or on release(), so resident memory grows
    by one chunk at most, and W0 costs one pass over the page cache instead of a copy plus a pass.
    """

    def __init__(self, folder: str | Path, names: dict[str, str] | None = None):
        """`folder`: a diffusers component folder, or one .safetensors file. `names` maps parameter names to
        the file's own tensor names (single files keep the original Wan / ComfyUI names and prefixes); fp8
        tensors with a ComfyUI `scale_weight` are dequantized with it when read in another dtype."""
        from engine.lora.files import read_safetensors_header

        self.folder = Path(folder)
        files = [self.folder] if self.folder.is_file() else sorted(self.folder.glob("*.safetensors"))
        raw: dict[str, tuple[Path, str, tuple[int, ...], int, int]] = {}
        for file in files:
            header, data_start = read_safetensors_header(file)
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                start, end = info["data_offsets"]
                raw[key] = (file, info["dtype"], tuple(info["shape"]), data_start + start, end - start)
        self.scales: dict[str, float] = {}
        if names is None:
            self.index = raw
        else:
            self.index = {name: raw[key] for name, key in names.items() if key in raw}
            from engine.models.keys import scale_key_of

            for name, key in names.items():
                scale_key = scale_key_of(key, raw) if key in raw and raw[key][1].startswith("F8") else None
                if scale_key is not None:
                    self.scales[name] = self._scalar(raw[scale_key])
        self._maps: dict[Path, mmap.mmap] = {}
        self._pending: tuple[mmap.mmap, int, int] | None = None

    @staticmethod
    def _scalar(entry) -> float:
        import torch

        file, st_dtype, shape, offset, _ = entry
        if math.prod(shape) != 1:  # per-row or per-block scales (int8/nvfp4/mxfp8 layouts): not a per-tensor fp8 scale
            raise RequestError(f"{Path(file).name}: a weight scale of shape {list(shape)}; only per-tensor fp8 scales "
                               "are read (use the fp8_scaled, bf16 or GGUF version of this file)")
        t = torch.empty((), dtype=_ST_DTYPES.get(st_dtype))
        fd = os.open(file, os.O_RDONLY)
        try:
            pread_into(fd, t, offset)
        finally:
            os.close(fd)
        return float(t)

    def stored_dtype(self, name: str):
        return _ST_DTYPES.get(self.index[name][1])

    def __bool__(self) -> bool:
        return bool(self.index)

    def shape(self, name: str) -> tuple[int, ...] | None:
        hit = self.index.get(name)
        return hit[2] if hit else None

    def read(self, name: str, dtype, rows: slice | None = None, scratch: "Scratch | None" = None):
        """The stored tensor (or a slice of its first dimension), cast to `dtype` like from_pretrained does.

        With `scratch`, the bytes land in a reused buffer (valid until the next read with it).
        """
        import torch

        file, st_dtype, shape, offset, _ = self.index[name]
        tdtype = _ST_DTYPES.get(st_dtype)
        row_elems = 1
        for s in shape[1:]:
            row_elems *= s
        elem = torch.empty((), dtype=tdtype).element_size()
        if rows is not None and shape:
            r0, r1, _ = rows.indices(shape[0])
            offset += r0 * row_elems * elem
            shape = (r1 - r0, *shape[1:])
        numel = 1
        for d in shape:
            numel *= d
        self.release()
        if scratch is not None and tdtype == dtype and numel and _CAN_DROP_PAGES:
            mm = self._map(file)
            view = torch.frombuffer(mm, dtype=tdtype, count=numel, offset=offset).view(shape)
            self._pending = (mm, offset, numel * elem)
            return view
        t = scratch.get("w0", numel, tdtype).view(shape) if scratch is not None else torch.empty(shape, dtype=tdtype)
        fd = os.open(file, os.O_RDONLY)
        try:
            pread_into(fd, t, offset)
        finally:
            os.close(fd)
        if tdtype != dtype and name in self.scales:
            from engine.models.fp8 import dequantize

            return dequantize(t, self.scales[name], dtype)
        return t.to(dtype)

    def release(self) -> None:
        """Drop the pages of the last streamed range from this process (they stay in the page cache)."""
        if self._pending is None:
            return
        mm, start, length = self._pending
        self._pending = None
        aligned = start - start % mmap.PAGESIZE
        mm.madvise(mmap.MADV_DONTNEED, aligned, start + length - aligned)

    def _map(self, file: Path) -> mmap.mmap:
        mm = self._maps.get(file)
        if mm is None:
            with open(file, "rb") as f:
                # ACCESS_COPY: private and writable for torch.frombuffer; nothing is ever written to it.
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            self._maps[file] = mm
        return mm


_CAN_DROP_PAGES = hasattr(mmap, "MADV_DONTNEED") and hasattr(mmap.mmap, "madvise")


def sources_for_module(module) -> list[WeightSource]:
    """Candidate safetensors folders a diffusers model was loaded from (its config's _name_or_path)."""
    config = getattr(module, "config", None)
    root = None
    if config is not None:
        root = config.get("_name_or_path") if hasattr(config, "get") else getattr(config, "_name_or_path", None)
    if not root or not os.path.isdir(str(root)):
        return []
    root = Path(root)
    out = []
    for folder in (root, root / "transformer", root / "transformer_2"):
        if folder.is_dir() and any(folder.glob("*.safetensors")):
            try:
                src = WeightSource(folder)
            except (OSError, ValueError, WanStackError) as e:
                log.info("not using %s as a weight source: %s", folder, e)
                continue
            if src:
                out.append(src)
    return out


class Scratch:
    """Reused work buffers for one merge pass.

    A fresh multi-megabyte allocation per layer is returned to the OS when freed and page-faults
    again on the next layer; on the 300 layers of a 1.3B model that cost more than the GEMMs.
    """

    def __init__(self):
        self._bufs: dict[tuple, Any] = {}

    def get(self, key: str, numel: int, dtype, device=None):
        import torch

        device = torch.device(device or "cpu")
        buf = self._bufs.get((key, dtype, device))
        if buf is None or buf.numel() < numel:
            buf = torch.empty(max(numel, 1), dtype=dtype, device=device)
            self._bufs[(key, dtype, device)] = buf
        return buf[:numel]


@dataclass
class Contribution:
    key: tuple  # (sha256, slot, weight): what makes this contribution distinct
    patch: Any  # engine.lora.formats.Patch
    weight: float
    schedule: Any = None  # a (step, total) -> strength function: runtime path, never merged


@dataclass
class MergeStats:
    written: int = 0
    restored: int = 0
    unchanged: int = 0
    gemm_flops: int = 0
    file_backed: int = 0
    copied_bytes: int = 0
    seconds: float = 0.0
    names: list[str] = field(default_factory=list)


def _offload_mirrors(module) -> dict[int, Any]:
    """CPU tensors that diffusers group offloading restores parameters and buffers from (stream mode), by id.

    With CUDA streams the hook keeps pinned CPU copies of every parameter and buffer, assigns them back to
    `param.data` on offload and onloads buffers from them (a group's buffers stay on the GPU between
    onloads). A merged weight, and an fp8 weight's changed `weight_scale`, must be written there too or
    the next offload or onload would silently undo it.
    """
    mirrors: dict[int, Any] = {}
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        if registry is None:
            continue
        for hook in list(getattr(registry, "hooks", {}).values()):
            group = getattr(hook, "group", None)
            if group is None:
                continue
            if getattr(group, "offload_to_disk_path", None):
                raise WanStackError(
                    "LoRA stacks cannot be merged while group offloading writes weights to disk "
                    "(offload_to_disk_path); use group offloading in RAM"
                )
            for param, tensor in getattr(group, "cpu_param_dict", {}).items():
                mirrors[id(param)] = tensor
    return mirrors


class ModuleMerger:
    """Holds the merge state of one module: which patches each parameter carries and where its W0 is."""

    def __init__(self, module, sources: list[WeightSource] | None = None):
        self._module = weakref.ref(module)
        self.params = dict(module.named_parameters())
        self.sources = list(sources) if sources is not None else sources_for_module(module)
        self.current: dict[str, tuple] = {}
        self.originals: dict[str, Any] = {}  # name -> CPU copy of W0 (when no source file has it)
        self.file_backed: dict[str, WeightSource] = {}
        self.fp8_scale0: dict[str, float] = {}  # name -> the fp8 weight's own scale, restored with W0
        self._scratch: Scratch | None = None

    @property
    def module(self):
        return self._module()

    def shapes(self) -> dict[str, tuple[int, ...]]:
        # GGUF parameters hold bytes; their `quant_shape` is the weight's logical shape
        return {n: tuple(getattr(p, "quant_shape", None) or p.shape) for n, p in self.params.items()}

    def mergeable(self, name: str) -> bool:
        """False for weights stored quantized in blocks (GGUF): LoRAs act on them at runtime instead."""
        return getattr(self.params.get(name), "quant_type", None) is None

    def originals_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.originals.values())

    def set(self, desired: dict[str, list[Contribution]]) -> MergeStats:
        """Make every parameter carry exactly `desired` (name -> contributions in stack order)."""
        import time

        import torch

        t0 = time.perf_counter()
        stats = MergeStats()
        mirrors = _offload_mirrors(self.module) if self.module is not None else {}
        self._scratch = Scratch()
        with torch.no_grad():
            for name in list(dict.fromkeys([*self.current, *desired])):
                contribs = [c for c in desired.get(name, []) if c.weight != 0.0]
                sig = tuple(c.key for c in contribs)
                if self.current.get(name, ()) == sig:
                    stats.unchanged += 1
                    continue
                param = self.params[name]
                if param.device.type == "meta":
                    raise WanStackError(
                        f"parameter {name} is on the meta device (accelerate offload); LoRA merging needs "
                        "real weights: use diffusers group offloading instead"
                    )
                if not sig:
                    self._restore(name, param)
                    stats.restored += 1
                else:
                    first = name not in self.current
                    if first:
                        self._remember(name, param, stats)
                    stats.gemm_flops += self._write(name, param, contribs, w0_is_live=first)
                    self.current[name] = sig
                    stats.written += 1
                stats.names.append(name)
                tensors = [param]
                if _is_fp8(param.dtype):  # its scale buffer too: a merge may have changed it
                    scale = self._owner(name)._buffers.get("weight_scale")
                    tensors += [scale] if scale is not None else []
                for t in tensors:
                    mirror = mirrors.get(id(t))
                    if mirror is not None and mirror.data_ptr() != t.data.data_ptr():
                        mirror.copy_(t.data)
        self._scratch = None
        for src in self.sources:
            src.release()
        stats.seconds = time.perf_counter() - t0
        return stats

    def restore_all(self) -> MergeStats:
        return self.set({})

    # -- W0 bookkeeping -------------------------------------------------------------------------

    def _remember(self, name: str, param, stats: MergeStats) -> None:
        """Called while `param` still holds W0: find it in a source file, or keep a copy of it."""
        for src in self.sources:
            if src.shape(name) == tuple(param.shape) and self._matches(src, name, param):
                self.file_backed[name] = src
                stats.file_backed += 1
                return
        copy = param.data.detach().to("cpu", copy=True)
        self.originals[name] = copy
        stats.copied_bytes += copy.numel() * copy.element_size()

    @staticmethod
    def _matches(src: WeightSource, name: str, param) -> bool:
        """Cheap identity check of the file tensor against the live weight: first and last rows."""
        import torch

        data = param.data

        def same(a, b) -> bool:  # bitwise, which also works for fp8 (torch.equal has no fp8 kernel on CPU)
            return a.dtype == b.dtype and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))

        if data.ndim == 0 or data.shape[0] <= 2:
            return same(src.read(name, data.dtype).to(data.device), data)
        n = data.shape[0]
        head = src.read(name, data.dtype, slice(0, 1)).to(data.device)
        tail = src.read(name, data.dtype, slice(n - 1, n)).to(data.device)
        return same(head, data[0:1]) and same(tail, data[n - 1:n])

    def _w0(self, name: str, param, rows: slice | None = None):
        if name in self.originals:
            t = self.originals[name]
            return (t if rows is None else t[rows]).to(param.device)
        src = self.file_backed[name]
        return src.read(name, param.dtype, rows, scratch=self._scratch).to(param.device)

    def _restore(self, name: str, param) -> None:
        if name not in self.current:
            return
        data = param.data
        if name in self.originals:
            data.copy_(self.originals.pop(name).to(data.device))
        else:
            flat = data.reshape(data.shape[0], -1) if data.ndim >= 2 else data.reshape(1, -1)
            step = _chunk_rows(flat.shape[1])
            for r0 in range(0, flat.shape[0], step):
                rows = slice(r0, min(r0 + step, flat.shape[0]))
                w0 = self._w0(name, param, rows if data.ndim >= 2 else None)
                flat[rows].copy_(w0.reshape(-1, flat.shape[1]))
            self.file_backed.pop(name)
        if name in self.fp8_scale0:
            from engine.models.fp8 import set_scale

            set_scale(self._owner(name), self.fp8_scale0.pop(name))
        del self.current[name]

    # -- the merge itself ------------------------------------------------------------------------

    def _write(self, name: str, param, contribs: list[Contribution], *, w0_is_live: bool) -> int:
        data = param.data
        w0_rows = None if w0_is_live else (lambda rows: self._w0(name, param, rows if data.ndim >= 2 else None))
        if _is_fp8(data.dtype):
            return self._write_fp8(name, param, contribs, w0_rows)
        return write_merged(data, contribs, w0_rows, name=name, scratch=self._scratch)

    def _write_fp8(self, name: str, param, contribs: list[Contribution], w0_rows) -> int:
        from engine.models.fp8 import set_scale

        owner = self._owner(name)
        s0 = self.fp8_scale0.setdefault(name, float(getattr(owner, "weight_scale", 1.0)))
        s_new, flops = write_merged_fp8(param.data, contribs, w0_rows, s0, name=name, scratch=self._scratch)
        set_scale(owner, s_new)
        return flops

    def _owner(self, name: str):
        module = self.module
        return module.get_submodule(name.rpartition(".")[0]) if "." in name else module



def merged_tensor(w0, contribs: list[Contribution]):
    """`w0` with the contributions merged, written into `w0` itself and returned (same dtype).

    The exact code in-place application runs (write_merged), so a model baked tensor by tensor
    (`lora merge`, engine/lora/rewrite.py) equals the in-place merge bit for bit.
    """
    write_merged(w0, contribs, None, name="tensor")
    return w0


def write_merged_fp8(data, contribs: list[Contribution], w0_rows, s0: float, *, name: str = "",
                     scratch: Scratch | None = None) -> tuple[float, int]:
    """Merge into fp8 weights stored as W / scale (engine/models/fp8.py): computed in fp32 from W0 and its
    scale `s0`, then rounded once back to fp8 in `data`. The scale stays `s0` unless the merged weights outgrow
    fp8's range under it; then it becomes max|W| / 448. Both depend only on W0 and the stack, so the in-place
    merge and `lora merge` into a file agree byte for byte. Returns (new scale, GEMM flops)."""
    from engine.models.fp8 import FP8_MAX

    peak: list[float] = []
    flops = write_merged(data, contribs, w0_rows, name=name, scratch=scratch, w0_scale=s0, measure=peak)
    s_new = s0 if peak[0] <= FP8_MAX * s0 else peak[0] / FP8_MAX
    flops += write_merged(data, contribs, w0_rows, name=name, scratch=scratch, w0_scale=s0 / s_new,
                          delta_scale=1.0 / s_new, clamp=FP8_MAX)
    return s_new, flops


def _is_fp8(dtype) -> bool:
    return str(dtype).startswith("torch.float8")


def write_merged(data, contribs: list[Contribution], w0_rows=None, *, name: str = "",
                 scratch: Scratch | None = None, w0_scale: float = 1.0, delta_scale: float = 1.0,
                 clamp: float | None = None, measure: list | None = None) -> int:
    """Write `W0 + sum_i w_i * scale_i * (B_i @ A_i) (+ w_i * diff_i)` into `data`, fp32 accumulation in row chunks.

    All ranks go into one GEMM per row chunk ([rows, sum r] @ [sum r, in]), so there is one rounding
    per element for the price of one call. `w0_rows(rows)` returns W0's rows when `data` no longer
    holds W0; None means `data` still holds it. Returns the GEMM flops.

    For stored-scaled weights (fp8) the sum is `w0_scale * W0 + delta_scale * delta`, clamped to `clamp`;
    with `measure` (a list) nothing is written and max |sum| is appended instead.
    """
    import torch

    scratch = scratch or Scratch()
    device = data.device
    flat = data.reshape(data.shape[0], -1) if data.ndim >= 2 else data.reshape(1, -1)
    if flat.data_ptr() != data.data_ptr() or not data.is_contiguous():
        raise WanStackError(f"parameter {name} is not contiguous; cannot merge a LoRA into it in place")
    out_dim, in_dim = flat.shape
    if any(not c.patch.additive for c in contribs):
        return _write_in_stack_order(flat, contribs, w0_rows, w0_scale=w0_scale, delta_scale=delta_scale,
                                     clamp=clamp, measure=measure)
    lowrank = [c for c in contribs if c.patch.kind == "lowrank"]
    diffs = [(c.weight, _full_delta(c.patch, device).reshape(out_dim, in_dim))
             for c in contribs if c.patch.kind != "lowrank"]
    total_rank = sum(int(c.patch.down.shape[0]) for c in lowrank)
    up = down = None
    if lowrank:
        up = scratch.get("up", out_dim * total_rank, torch.float32, device).view(out_dim, total_rank)
        down = scratch.get("down", total_rank * in_dim, torch.float32, device).view(total_rank, in_dim)
        off = 0
        for c in lowrank:
            p = c.patch
            r = int(p.down.shape[0])
            up[:, off:off + r].copy_(p.up.reshape(out_dim, r)).mul_(c.weight * p.scale * delta_scale)
            down[off:off + r].copy_(p.down.reshape(r, in_dim))
            off += r
    step = _chunk_rows(in_dim) if data.ndim >= 2 else out_dim
    peak = 0.0
    for r0 in range(0, out_dim, step):
        rows = slice(r0, min(r0 + step, out_dim))
        n = rows.stop - rows.start
        acc = scratch.get("acc", n * in_dim, torch.float32, device).view(n, in_dim)
        acc.copy_(flat[rows] if w0_rows is None else w0_rows(rows).reshape(n, in_dim))
        if w0_scale != 1.0:
            acc.mul_(w0_scale)
        if up is not None:
            acc.addmm_(up[rows], down)
        for w, d in diffs:
            acc.add_(d[rows].to(device=device, dtype=torch.float32), alpha=w * delta_scale)
        if measure is not None:
            peak = max(peak, float(acc.abs().max())) if acc.numel() else peak
            continue
        if clamp is not None:
            acc.clamp_(-clamp, clamp)
        flat[rows].copy_(acc)
    if measure is not None:
        measure.append(peak)
    return 2 * out_dim * in_dim * total_rank


def _full_delta(patch, device):
    """A full-size additive change (LightX2V diff as stored; LoKr/LoHa built in fp32, scale included)."""
    import torch

    return patch.diff if patch.kind == "diff" else patch.delta(torch.float32, device)


def _write_in_stack_order(flat, contribs: list[Contribution], w0_rows, *, w0_scale: float = 1.0,
                          delta_scale: float = 1.0, clamp: float | None = None, measure: list | None = None) -> int:
    """A weight that carries a DoRA entry: the whole tensor in fp32, each entry applied in stack order.

    DoRA is not additive (it renormalises the weight it is applied to), so the result is built
    from W0 entry by entry: additive entries add w * ΔW, a DoRA entry replaces the accumulator with
    dora_apply(accumulator). Removal still writes W0 back from its source, bit for bit.
    Stored-scaled (fp8) weights are merged in real units, W0 * w0_scale / delta_scale, and stored times
    delta_scale (write_merged's convention), clamped to `clamp`; `measure` gets max |W| instead of a write.
    """
    import torch

    out_dim, in_dim = flat.shape
    src = flat if w0_rows is None else w0_rows(slice(0, out_dim)).reshape(out_dim, in_dim)
    acc = src.to(device=flat.device, dtype=torch.float32, copy=True)
    if w0_scale != delta_scale:
        acc.mul_(w0_scale / delta_scale)
    flops = 0
    for c in contribs:
        p = c.patch
        if p.kind == "dora":
            acc = dora_apply(acc, p, c.weight)
        elif p.kind == "lowrank":
            r = int(p.down.shape[0])
            up = p.up.reshape(out_dim, r).to(device=acc.device, dtype=torch.float32) * (c.weight * p.scale)
            acc.addmm_(up, p.down.reshape(r, in_dim).to(device=acc.device, dtype=torch.float32))
            flops += 2 * out_dim * in_dim * r
        else:
            acc.add_(_full_delta(p, acc.device).reshape(out_dim, in_dim).to(torch.float32), alpha=c.weight)
    if measure is not None:
        measure.append(float(acc.abs().max()) if acc.numel() else 0.0)
        return flops
    if delta_scale != 1.0:
        acc.mul_(delta_scale)
    if clamp is not None:
        acc.clamp_(-clamp, clamp)
    flat.copy_(acc)
    return flops


DORA_EPS = 1.1920928955078125e-07  # torch.finfo(torch.float32).eps, which LyCORIS adds to the norm


def dora_apply(w, patch, strength: float):
    """A DoRA entry applied to `w` ([out, in...] flattened to 2-D, fp32): returns the new weight (fp32).

    At strength 1 both trainers agree: W = m * (w + ΔW) / ||w + ΔW||, with the norm per output row
    (PEFT's lora_magnitude_vector, a LyCORIS dora_scale of shape [out, 1]) or per input column (a
    dora_scale of shape [1, in], LyCORIS's default before April 2025). At other strengths we follow
    each file's trainer (the tools disagree; ComfyUI interpolates between W0 and the result, and
    divides by ||W0|| in one case, which neither trainer does):
      PEFT (lora_magnitude_vector): the strength scales ΔW inside the norm, as PEFT's set_adapters
        weight does: W = m * (w + s ΔW) / ||w + s ΔW||  (diffusers' load + fuse computes exactly this).
      LyCORIS (dora_scale): its forward() multiplier: V = w + ΔW, W = V * (s (m / (||V|| + eps) - 1) + 1).
    Weight 0 switches an entry off (the engine skips it), so W0 stays W0 either way.
    """
    import torch

    inner = patch.inner
    out_dim = w.shape[0]
    if inner.kind == "lowrank":
        r = int(inner.down.shape[0])
        up = inner.up.reshape(out_dim, r).to(device=w.device, dtype=torch.float32) * inner.scale
        delta = up @ inner.down.reshape(r, -1).to(device=w.device, dtype=torch.float32)
    else:
        delta = _full_delta(inner, w.device).reshape(w.shape).to(torch.float32)
    m = patch.magnitude.to(device=w.device, dtype=torch.float32)
    if patch.dora_style == "peft":
        v = w + strength * delta
        return v * (m.reshape(-1, 1) / torch.linalg.vector_norm(v, dim=1, keepdim=True))
    v = w + delta
    if m.shape[0] == out_dim and m.numel() == out_dim:  # dora_scale [out, 1, ...]: per output row
        norm = torch.linalg.vector_norm(v, dim=1, keepdim=True)
        k = m.reshape(-1, 1) / (norm + DORA_EPS)
        return v * (strength * (k - 1) + 1)
    in_ch = m.numel()  # dora_scale [1, in, ...]: per input channel, over the rows and any kernel
    v3 = v.reshape(out_dim, in_ch, -1)
    norm = torch.linalg.vector_norm(v3, dim=(0, 2), keepdim=True)
    k = m.reshape(1, in_ch, 1) / (norm + DORA_EPS)
    return (v3 * (strength * (k - 1) + 1)).reshape(v.shape)


def _chunk_rows(cols: int) -> int:
    return max(1, CHUNK_BYTES // max(1, cols * 4))


def model_param_shapes(folder: str | Path) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of a transformer folder, from its safetensors headers (no weights read)."""
    from engine.lora.files import read_safetensors_header

    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        header, _ = read_safetensors_header(file)
        for key, info in header.items():
            if key != "__metadata__":
                shapes[key] = tuple(info["shape"])
    return shapes


def transformer_config(folder: str | Path) -> dict:
    with open(Path(folder) / "config.json", encoding="utf-8") as f:
        return json.load(f)
