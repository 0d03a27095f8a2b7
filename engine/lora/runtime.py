"""Runtime (unmerged) LoRA: patches act through forward hooks with a per-step strength; weights stay W0.

For a module whose forward is a linear map (nn.Linear, diffusers' GGUF linear layers, anything with
`in_features`/`out_features` and a 2-D weight), a forward hook adds

    y += s_i * (x @ A_iᵀ) @ (scale_i * B_i)ᵀ      (low-rank patches)
    y += s_i * x @ ΔW_iᵀ,   y += s_i * Δb_i         (full diffs: LightX2V diff/diff_b, LoKr, LoHa)

in the input's dtype on the input's device. Only the module's input and output are used, so the
weight may be quantized (GGUF). Each entry's strength `s_i` is a 0-d float64 tensor per device that
`set_step()` updates in place, so a torch.compile'd transformer sees the same graph at every step
(no recompiles).

Targets that are not the weight/bias of a linear-like module (bare parameters such as Wan's
modulation `scale_shift_table`, norms, the Conv3d patch embedding) are small; they are rewritten as
`W0 + sum_i s_i * ΔW_i` (fp32 accumulation) whenever a strength changes, from a copy of W0 kept
here. DoRA patches are not additive and are refused (they must be merged).

`detach()` removes every hook and writes every rewritten parameter back to W0 bit for bit.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence, Union

from engine.types import WanStackError

log = logging.getLogger(__name__)

StrengthFn = Callable[[int, int], float]
Strength = Union[float, int, Sequence[float], StrengthFn]


class RuntimeLoraError(WanStackError):
    """A patch cannot be applied through the runtime path (the message names the target and the fix)."""


def strength_fn(strength: Strength) -> StrengthFn:
    """A number (constant), a list of values spread evenly over the steps, or a (step, total) -> value function."""
    if callable(strength):
        return strength
    if isinstance(strength, (int, float)):
        value = float(strength)
        return lambda step, total: value
    values = [float(v) for v in strength]
    if not values:
        raise RuntimeLoraError("a strength schedule needs at least one value")
    from engine.lora.schedule import value_at

    return lambda step, total: value_at(values, step, total)


def is_linear_like(module) -> bool:
    """True when the module's forward is `x @ weightᵀ + bias` (nn.Linear, GGUF linear layers and their kin)."""
    import torch.nn as nn

    if isinstance(module, nn.Linear):
        return True
    return hasattr(module, "in_features") and hasattr(module, "out_features") and \
        getattr(getattr(module, "weight", None), "ndim", 0) == 2


@dataclass
class _Entry:
    key: str
    fn: StrengthFn
    value: float
    tensors: dict[Any, Any] = field(default_factory=dict)  # device -> 0-d float64 strength
    modules: int = 0
    rewritten: int = 0
    flops_per_token: int = 0

    def strength_on(self, device):
        import torch

        t = self.tensors.get(device)
        if t is None:
            t = torch.tensor(self.value, dtype=torch.float64, device=device)  # 0-d: never promotes the input dtype
            self.tensors[device] = t
        return t

    def set(self, value: float) -> bool:
        if value == self.value:
            return False
        self.value = value
        for t in self.tensors.values():
            t.fill_(value)
        return True


class _LinearHook:
    """The forward hook of one linear-like module: adds every runtime patch aimed at its weight or bias."""

    def __init__(self, shape: tuple[int, int]):
        self.shape = shape  # (out_features, in_features)
        self.lowrank: list[tuple[_Entry, Any, Any, float]] = []  # (entry, down [r, in], up [out, r], scale) as stored
        self.full: list[tuple[_Entry, Any]] = []  # (entry, patch) with a full ΔW [out, in]
        self.bias: list[tuple[_Entry, Any]] = []  # (entry, patch) with a Δb [out]
        self._prepared: dict[tuple, tuple] = {}  # (device, dtype) -> tensors cast for that input

    def _for(self, device, dtype) -> tuple:
        import torch

        hit = self._prepared.get((device, dtype))
        if hit is None:
            acc = torch.float64 if dtype == torch.float64 else torch.float32  # scale folded in at >= fp32

            def cast(t, scale=1.0):
                return (t.to(device=device, dtype=acc) * scale).to(dtype)

            hit = (
                [(e.strength_on(device), cast(a), cast(b, s)) for e, a, b, s in self.lowrank],
                [(e.strength_on(device), cast(p.delta(acc, device), 1.0).reshape(self.shape)) for e, p in self.full],
                [(e.strength_on(device), cast(p.delta(acc, device), 1.0).reshape(-1)) for e, p in self.bias],
            )
            self._prepared[(device, dtype)] = hit
        return hit

    def __call__(self, module, args, output):
        import torch.nn.functional as F

        x = args[0]
        lowrank, full, bias = self._for(x.device, x.dtype)
        y = output
        for s, down, up in lowrank:
            y = y + F.linear(F.linear(x, down) * s, up).to(y.dtype)
        for s, d in full:
            y = y + (F.linear(x, d) * s).to(y.dtype)
        for s, b in bias:
            y = y + (b * s).to(y.dtype)
        return y


class _Rewrite:
    """A small parameter that is not a linear map's input: rewritten to W0 + sum s_i ΔW_i when strengths change."""

    def __init__(self, name: str, param):
        self.name = name
        self.param = param
        self.w0 = None  # taken at attach: the parameter as it is then (merged entries included)
        self.deltas: list[tuple[_Entry, Any]] = []

    def write(self) -> None:
        import torch

        if self.w0 is None:
            self.w0 = self.param.data.detach().clone()
        with torch.no_grad():
            live = [(e, d) for e, d in self.deltas if e.value != 0.0]
            if not live:
                self.param.data.copy_(self.w0)
                return
            acc = self.w0.to(torch.float64 if self.w0.dtype == torch.float64 else torch.float32).clone()
            for e, d in live:
                acc.add_(d.to(acc.device).reshape(acc.shape), alpha=e.value)
            self.param.data.copy_(acc.to(self.param.dtype))

    def restore(self) -> None:
        import torch

        if self.w0 is None:
            return
        with torch.no_grad():
            self.param.data.copy_(self.w0)
        self.w0 = None


class RuntimeLoras:
    """Unmerged LoRA patches on one transformer, with per-entry strengths that can change at every step.

    Usage (owned by the loaded pipeline, one per expert):

        rt = RuntimeLoras(transformer)
        rt.add("style", patches, [1.0, 0.8, 0.5])    # normalised Patch objects, a strength or schedule
        with rt:                                     # attach() ... detach()
            for i in range(steps):
                rt.set_step(i, steps)
                transformer(...)

    `patches` are the same `engine.lora.formats.Patch` objects the merge path uses (target = the
    transformer's parameter name), so any file the merge path reads, and any layer whose forward is
    linear, works here too.
    """

    def __init__(self, module, *, name: str = ""):
        self.module = module
        self.name = name
        self._entries: dict[str, _Entry] = {}
        self._hooks: dict[str, _LinearHook] = {}  # module path -> hook
        self._rewrites: dict[str, _Rewrite] = {}  # parameter name -> rewrite
        self._handles: list[Any] = []
        self._step: tuple[int, int] | None = None

    # -- building --------------------------------------------------------------------------------

    def add(self, key: str, patches: Iterable[Any], strength: Strength = 1.0) -> None:
        """Add an entry's patches (before attach). `strength` is a number, a schedule list or a function."""
        import torch

        if self._handles:
            raise RuntimeLoraError(f"runtime LoRA {key!r} added while attached; detach first")
        if key in self._entries:
            raise RuntimeLoraError(f"runtime LoRA entry {key!r} was already added; use a distinct key per entry")
        fn = strength_fn(strength)
        entry = _Entry(key, fn, float(fn(0, 1)))
        modules = dict(self.module.named_modules())
        params = dict(self.module.named_parameters())
        touched: set[str] = set()
        for p in patches:
            if p.kind == "dora":
                raise RuntimeLoraError(
                    f"{key}: {p.target} is a DoRA patch; DoRA is not additive (it renormalises W0 + ΔW), "
                    "so it cannot run unmerged; use a constant weight so it is merged"
                )
            owner, _, attr = p.target.rpartition(".")
            mod = modules.get(owner)
            if p.target not in params and mod is None:
                raise RuntimeLoraError(f"{key}: the model has no parameter {p.target}")
            if mod is not None and attr in ("weight", "bias") and is_linear_like(mod):
                out_f, in_f = int(mod.out_features), int(mod.in_features)
                hook = self._hooks.setdefault(owner, _LinearHook((out_f, in_f)))
                numel = 1
                for d in p.delta_shape():
                    numel *= d
                if numel != (out_f if attr == "bias" else out_f * in_f):
                    raise RuntimeLoraError(
                        f"{key}: {p.target} delta {p.delta_shape()} does not fit the layer ({out_f}, {in_f})")
                if attr == "bias":
                    hook.bias.append((entry, p))
                elif p.kind == "lowrank":
                    rank = int(p.down.shape[0])
                    hook.lowrank.append((entry, p.down.reshape(rank, -1), p.up.reshape(out_f, rank), float(p.scale)))
                    entry.flops_per_token += 2 * rank * (in_f + out_f)
                else:
                    hook.full.append((entry, p))
                    entry.flops_per_token += 2 * in_f * out_f
                touched.add(owner)
            else:
                param = params.get(p.target)
                if param is None:
                    raise RuntimeLoraError(f"{key}: the model has no parameter {p.target}")
                if not param.is_floating_point() or hasattr(param, "quant_type"):
                    raise RuntimeLoraError(
                        f"{key}: {p.target} is stored quantized ({type(param).__name__}) and is not the weight of "
                        "a linear layer, so the runtime path cannot change it")
                rw = self._rewrites.get(p.target)
                if rw is None:
                    rw = self._rewrites[p.target] = _Rewrite(p.target, param)
                rw.deltas.append((entry, p.delta(torch.float64 if param.dtype == torch.float64 else torch.float32)))
                entry.rewritten += 1
        entry.modules = len(touched)
        self._entries[key] = entry

    # -- lifetime --------------------------------------------------------------------------------

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self, device=None, dtype=None) -> "RuntimeLoras":
        """Register the hooks and prepare the patches for `device`/`dtype` (default: where the module's
        floating-point weights are, in their dtype). Inputs on another device or dtype get their own
        copies at first use; under torch.compile call `prepare()` for the execution device first, so the
        traced graph only reads tensors that already exist (no recompiles)."""
        if self._handles:
            return self
        if device is None or dtype is None:
            floats = [p for p in self.module.parameters() if p.is_floating_point()]
            device = device if device is not None else (floats[0].device if floats else None)
            dtype = dtype if dtype is not None else (floats[0].dtype if floats else None)
        if device is not None and dtype is not None:
            self.prepare(device, dtype)
        modules = dict(self.module.named_modules())
        for path, hook in self._hooks.items():
            self._handles.append(modules[path].register_forward_hook(hook))
        for rw in self._rewrites.values():
            rw.write()
        return self

    def detach(self) -> None:
        """Remove every hook and give every rewritten parameter its W0 back, bit for bit."""
        for h in self._handles:
            h.remove()
        self._handles = []
        for rw in self._rewrites.values():
            rw.restore()
        for hook in self._hooks.values():
            hook._prepared.clear()
        for e in self._entries.values():
            e.tensors.clear()

    def prepare(self, device, dtype) -> None:
        """Cast the patches and create the strength tensors for inputs of `dtype` on `device` now."""
        import torch

        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        for hook in self._hooks.values():
            hook._for(device, dtype)

    def __enter__(self) -> "RuntimeLoras":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    # -- per step --------------------------------------------------------------------------------

    def set_step(self, step_index: int, total_steps: int) -> None:
        """Update every entry's strength in place for this step (no new tensors, no graph change)."""
        self._step = (step_index, total_steps)
        changed = {key for key, e in self._entries.items() if e.set(float(e.fn(step_index, total_steps)))}
        if changed and self._handles:
            for rw in self._rewrites.values():
                if any(e.key in changed for e, _ in rw.deltas):
                    rw.write()

    def strengths(self) -> dict[str, float]:
        return {k: e.value for k, e in self._entries.items()}

    def report(self) -> dict[str, dict[str, Any]]:
        """Per entry: mode "runtime", hooked modules, rewritten parameters, extra flops per token, strength now."""
        return {k: {"mode": "runtime", "modules": e.modules, "rewritten": e.rewritten,
                    "flops_per_token": e.flops_per_token, "strength": e.value}
                for k, e in self._entries.items()}

    def __len__(self) -> int:
        return len(self._entries)


__all__ = ["RuntimeLoras", "RuntimeLoraError", "is_linear_like", "strength_fn"]
