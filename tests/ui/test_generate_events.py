"""The run driver: engine callbacks become UI updates in order; stale previews are skipped; closing the
handler (page gone) cancels the engine; engine errors reach the handler."""
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from engine.types import GenerationCancelled, GenerationRequest, GenerationResult, StepInfo
from ui.generate import run_events


@dataclass
class Settings:
    presets_dir: Path
    offload: str = "auto"


class ScriptedEngine:
    """Emits a fixed event script from generate(); can block mid-run until released."""

    def __init__(self, steps=3, gate=None, fail=None, step_delay_s=0.0):
        self.steps, self.gate, self.fail, self.step_delay_s = steps, gate, fail, step_delay_s
        self.cancelled = threading.Event()

    def generate(self, request, on_event, stream_video=False):
        on_event("status", "loading")
        on_event("loras", [{"file": "a.safetensors", "status": "applied", "coverage": {"applied": 40, "total": 40}}])
        on_event("plan", {"mode": "none", "vae_tiling": False, "estimate_bytes": {"peak": 1 << 30}, "reasons": ["fits"]})
        frame = Image.new("RGB", (8, 8), "red")
        for i in range(self.steps):
            if self.gate is not None and i == 1:
                self.gate.wait(5)
                if self.cancelled.is_set():
                    raise GenerationCancelled("stopped after step 1")
            time.sleep(self.step_delay_s)
            on_event("step", StepInfo(i + 1, self.steps, 0.01, "single", [frame, frame]))
        if self.fail:
            raise self.fail
        on_event("memory", {"ram_used_bytes": 1 << 30, "ram_total_bytes": 4 << 30, "peak_ram_bytes": 1 << 29})
        return GenerationResult("x.mp4", 1, 9, 64, 64, 8, 0.1, "none")

    def cancel(self):
        self.cancelled.set()
        if self.gate is not None:
            self.gate.set()


class Ctx:
    def __init__(self, engine):
        self.engine = engine


REQ = GenerationRequest(model="m", prompt="p")


def test_report_and_plan_come_before_the_first_step_and_every_step_reports():
    updates = list(run_events(Ctx(ScriptedEngine(step_delay_s=0.2)), REQ))  # the consumer keeps up
    first_step = next(i for i, u in enumerate(updates) if "step " in str(u[1].get("status", "")))
    before = [u[1] for u in updates[:first_step]]
    assert {"report", "plan", "status"} <= {k for u in before for k in u}
    # the burst before the first step (status, stack report, plan) reaches the page as one update
    assert len(before) == 1 and before[0]["status"] == "loading"
    steps = [u[1] for u in updates if u[0] == "update" and "step " in str(u[1].get("status", ""))]
    assert [s["status"].split(" ·")[0] for s in steps] == ["step 1/3", "step 2/3", "step 3/3"]
    assert all("data:image/gif;base64," in s["preview"] for s in steps)  # nothing queued behind them
    assert "40/40 keys applied" in before[0]["report"]
    assert "after the run" in updates[-2][1]["gauge"] and updates[-1][0] == "result"


def test_stale_previews_are_skipped_when_steps_pile_up():
    engine = ScriptedEngine(steps=6)
    events = run_events(Ctx(engine), REQ)
    first = next(events)  # the engine races ahead while we hold this update
    time.sleep(0.3)
    rest = [first] + list(events)
    steps = [u[1] for u in rest if u[0] == "update" and "step " in str(u[1].get("status", ""))]
    assert len(steps) == 6 and "preview" in steps[-1]
    assert sum("preview" in s for s in steps) < 6


def test_closing_the_handler_cancels_the_engine():
    engine = ScriptedEngine(steps=4, gate=threading.Event())
    events = run_events(Ctx(engine), REQ)
    for kind, update in events:
        if "step 1/4" in str(update.get("status", "")):
            break
    events.close()
    assert engine.cancelled.is_set()


def test_engine_errors_reach_the_handler():
    with pytest.raises(RuntimeError, match="boom"):
        list(run_events(Ctx(ScriptedEngine(fail=RuntimeError("boom"))), REQ))
