"""benchmarks/step_cost.py runs and keeps its JSON contract: the tiny shape on the CPU, the real 1.3B shape
with every attention backend on CUDA (gpu-marked, unattended)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def _run(*args: str, timeout: int) -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_cost.py"), *args, "--json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_step_cost_small_runs_every_variant_and_reports_ratios():
    r = _run("--small", "--steps", "10", "--repeats", "1", "--no-compile", timeout=900)
    variants = r["variants"]
    assert {"none", "merged", "runtime", "cache"} <= set(variants)
    assert "unfused" in variants or r.get("unfused_error")
    assert variants["none"]["ratio"] == 1.0
    for row in variants.values():
        assert row["s_per_step"] > 0 and row["ratio"] > 0 and len(row["runs"]) == 1
    counts = variants["cache"]["counts"]
    assert counts["steps_computed"] + counts["steps_skipped"] == 10


@pytest.mark.gpu
def test_step_cost_gpu_times_each_attention_backend_at_the_real_shape():
    r = _run("--gpu", "--steps", "4", "--repeats", "1", "--no-compile", timeout=1800)
    assert r["model"]["num_layers"] == 30 and r["model"]["attention_head_dim"] * r["model"]["num_attention_heads"] == 1536
    assert r["attention"]["native"]["s_per_step"] > 0
    assert r["attention_used"] in r["attention"]
    assert r["variants"]["merged"]["s_per_step"] > 0
