"""Text and HTML of the run panel (pure, no gradio): the one progress element, the latent preview, the
per-expert stack report, the memory plan and the VRAM/RAM gauge, all from the engine's typed views."""
from __future__ import annotations

import base64
import html

from engine.port import EXPERT_NAMES, MemoryView, PlanView, StackReport
from engine.types import format_weight

GIB = 1 << 30
IDLE_PREVIEW = "<div class='preview-box empty'><span>the latents appear here, every step</span></div>"


def progress_html(text: str, fraction: float | None = None, state: str = "idle", detail: str = "") -> str:
    """The run panel's single progress element: one line of text, one bar, one detail line."""
    pct = 0 if fraction is None else max(0, min(100, round(100 * fraction)))
    bar = (f"<div class='run-bar' role='progressbar' aria-valuenow='{pct}' aria-valuemin='0' aria-valuemax='100'>"
           f"<span style='width:{pct}%'></span></div>") if fraction is not None else ""
    sub = f"<div class='run-detail'>{html.escape(detail)}</div>" if detail else ""
    return f"<div class='run-progress {state}'><div class='run-line'>{html.escape(text)}</div>{bar}{sub}</div>"


def step_text(step: int, total: int, seconds: float, eta_s: float, expert: str) -> tuple[str, str]:
    """('step 5/20 · 0.12 s/step · ETA 1.8 s · high-noise expert', detail)."""
    where = "" if expert == "single" else f" · {EXPERT_NAMES.get(expert, expert)} expert"
    return f"step {step}/{total} · {seconds:.2f} s/step · ETA {eta_s:.1f} s{where}", ""


def preview_html(gif: bytes | None, step: int, total: int) -> str:
    """The latent preview GIF inline (a data URL): no file copy and no second request, so it lands with the step."""
    if not gif:
        return IDLE_PREVIEW
    data = base64.b64encode(gif).decode()
    return (f"<div class='preview-box'><img alt='latent preview, step {step} of {total}' "
            f"src='data:image/gif;base64,{data}'><span>latents · step {step}/{total}</span></div>")


def report_markdown(report: StackReport | None) -> str:
    """The applied stack per expert: which entries act on each expert, with weight and keys applied there."""
    if report is None:
        return ""
    if not report.entries:
        return "**Stack:** no LoRAs"
    lines = []
    for expert in report.experts:
        acting = report.on_expert(expert)
        title = "Model" if expert == "single" else f"{EXPERT_NAMES[expert].capitalize()} expert"
        lines.append(f"**{title}:** {len(acting)} LoRA{'s' if len(acting) != 1 else ''}")
        for e in acting:
            cov = e.by_expert.get(expert)
            cov_text = f" · {cov.text()}" if cov else ""
            mode = f" · {e.mode_note}" if e.mode == "runtime" and e.mode_note else ""  # issue 11: schedules
            lines.append(f"- `{e.file}` × {format_weight(e.weights.get(expert, 0))}{cov_text}{mode}")
    other = [e for e in report.entries if e.status != "applied"]
    for e in other:
        why = f": {e.reason}" if e.reason else ""
        lines.append(f"- `{e.file}` {e.status}{why}")
    warnings = [w for e in report.entries for w in e.warnings]
    if warnings:
        lines.append("")
        lines += [f"⚠ {w}" for w in warnings]
    return "\n".join(lines)


def plan_markdown(plan: PlanView | None) -> str:
    if plan is None:
        return ""
    text = f"**Memory plan:** {plan.label or plan.mode} on {plan.device}"
    if plan.peak_bytes:
        text += f", peak estimate {plan.peak_bytes / GIB:.2f} GiB"
    if not plan.fits:
        text += " · ⚠ may not fit"
    if plan.reasons:
        text += "<br>" + " ".join(_sentence(r) for r in plan.reasons)
    if plan.speed.get("reasons"):  # attention, compile, step cache (ui/speed_panel.py)
        text += "<br>**Speed:** " + " ".join(_sentence(r) for r in plan.speed["reasons"])
    return text


def _sentence(text: str) -> str:
    """Plan reasons are clauses ("needs 3 GiB of RAM: fits"); shown one after another they read as sentences."""
    text = str(text).strip()
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text[-1] in ".!?" else text + "."


def gauge_html(sample: MemoryView | None, final: bool = False) -> str:
    """VRAM/RAM gauge from a Memory event (or the idle engine.vram() view)."""
    if sample is None:
        return ""
    parts = []
    if sample.vram_used_bytes is None:
        reason = html.escape(sample.reason or "NVML gave no figures", quote=True)
        parts.append(f"<span title='{reason}'>VRAM: not available (hover for why)</span>")
    for label, used, total, peak, peak_label in (
            ("VRAM", sample.vram_used_bytes, sample.vram_total_bytes, sample.peak_vram_bytes, "peak"),
            ("RAM", sample.ram_used_bytes, sample.ram_total_bytes, sample.peak_ram_bytes, "app peak")):
        if used is None:
            continue
        pct = 100 * used / total if total else 0
        bar = f"<span class='gauge'><span style='width:{pct:.0f}%'></span></span>" if total else ""
        text = f"{label} {bar} {used / GIB:.2f}" + (f" / {total / GIB:.1f}" if total else "") + " GiB"
        if peak:
            text += f" ({peak_label} {peak / GIB:.2f})"
        parts.append(text)
    prefix = "<b>after the run</b> · " if final else ""
    return prefix + " &nbsp; ".join(parts)


def error_html(message: str) -> str:
    """The page's one error message (empty string: none)."""
    if not message:
        return ""
    return f"<div class='run-error-box' role='alert'>⚠ {html.escape(message)}</div>"
