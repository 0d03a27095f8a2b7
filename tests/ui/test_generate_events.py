"""The run driver: typed engine events become run-panel updates in order; stale previews are skipped;
closing the handler (page gone) cancels the engine; a failure ends the run as one Failed outcome."""
import threading
import time

from engine.port import Memory, MemoryView, Plan, PlanView, StackApplied, StackReport, Status, Step
from engine.types import GenerationCancelled, GenerationRequest, GenerationResult, WanStackError
from fake_engine import T2V, FakeEngine
from ui.context import UIContext
from ui.generate import build_request, run_events
from ui.stack_logic import to_stack

GIF = b"GIF89a-fake"


def script(steps=3, gate=None, fail=None, step_delay_s=0.0):
    def play(request, emit, engine):
        emit(Status("loading"))
        emit(StackApplied(StackReport.from_rows(
            [{"file": "a.safetensors", "status": "applied", "weights": {"single": 1.0},
              "coverage": {"applied": 40, "total": 40}, "coverage_by_expert": {"single": {"applied": 40, "total": 40}}}],
            ("single",))))
        emit(Plan(PlanView("none", reasons=("fits",), peak_bytes=1 << 30)))
        for i in range(steps):
            if gate is not None and i == 1:
                gate.wait(5)
                if engine.cancelled.is_set():
                    raise GenerationCancelled("stopped after step 1")
            time.sleep(step_delay_s)
            emit(Step(i + 1, steps, 0.01, "single", GIF))
        if fail:
            raise fail
        emit(Memory(MemoryView(ram_used_bytes=1 << 30, ram_total_bytes=4 << 30, peak_ram_bytes=1 << 29)))
        return GenerationResult("x.mp4", 1, 9, 64, 64, 8, 0.1, "none")
    return play


def ctx_with(tmp_path, play):
    return UIContext(FakeEngine(tmp_path, script=play))


def request(ctx):
    return build_request(ctx, T2V, "a fox", "", None, 64, 64, 9, 3, 1, to_stack([]))


def test_report_and_plan_come_before_the_first_step_and_every_step_reports(tmp_path):
    ctx = ctx_with(tmp_path, script(step_delay_s=0.2))  # the consumer keeps up
    updates = list(run_events(ctx, request(ctx)))
    first_step = next(i for i, u in enumerate(updates) if "step 1/3" in str(u[1]))
    before = [u[1] for u in updates[:first_step]]
    # the burst before the first step (status, stack report, plan) reaches the page as one update
    assert len(before) == 1 and {"report", "plan", "progress"} <= set(before[0])
    assert "loading" in before[0]["progress"] and "40/40 keys applied" in before[0]["report"]
    steps = [u[1] for u in updates if u[0] == "update" and "step " in str(u[1].get("progress", ""))]
    assert [s["progress"].count("role='progressbar'") for s in steps] == [1, 1, 1]  # one bar per update
    assert all("data:image/gif;base64," in s["preview"] for s in steps)  # encoded bytes, drawn inline
    assert "after the run" in updates[-2][1]["gauge"] and updates[-1][0] == "result"


def test_stale_previews_are_skipped_when_steps_pile_up(tmp_path):
    ctx = ctx_with(tmp_path, script(steps=6))
    events = run_events(ctx, request(ctx))
    first = next(events)  # the engine races ahead while we hold this update
    time.sleep(0.3)
    rest = [first] + list(events)
    steps = [u[1] for u in rest if u[0] == "update" and "step " in str(u[1].get("progress", ""))]
    assert len(steps) == 6 and "preview" in steps[-1]
    assert sum("preview" in s for s in steps) < 6


def test_closing_the_handler_cancels_the_engine(tmp_path):
    ctx = ctx_with(tmp_path, script(steps=4, gate=threading.Event()))
    events = run_events(ctx, request(ctx))
    for kind, update in events:
        if "step 1/4" in str(update.get("progress", "")):
            break
    events.close()
    assert ctx.engine.cancelled.is_set()


def test_a_failure_ends_the_run_as_one_failed_outcome(tmp_path):
    ctx = ctx_with(tmp_path, script(fail=WanStackError("boom: the VAE ran out of memory")))
    updates = list(run_events(ctx, request(ctx)))
    kind, failed = updates[-1]
    assert kind == "failed" and failed.message == "boom: the VAE ran out of memory" and not failed.cancelled
    assert [k for k, _ in updates].count("failed") == 1


def test_the_request_is_validated_once_at_the_door(tmp_path):
    ctx = ctx_with(tmp_path, script())
    checked = request(ctx)
    assert ctx.engine.validated == [checked] and checked.resolved.steps == 3
    assert isinstance(checked.request, GenerationRequest)
