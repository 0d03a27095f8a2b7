"""Smoke test of benchmarks/runtime_lora.py on a tiny shape: it runs, both sides compute the same sum, JSON contract."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.slow
def test_runtime_lora_benchmark_small_json():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "runtime_lora.py"), "--small", "--json",
                           "--steps", "2", "--repeats", "1"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("base_step_s", "ours_runtime_step_s", "peft_step_s", "peft_fixed_step_s", "ours_set_step_s"):
        assert isinstance(r[key], float) and r[key] > 0, key
    assert r["rel_diff_vs_peft"] < 1e-5  # the runtime hooks and PEFT's unfused layers add the same LoRA
    assert r["merged_overhead_s"] == 0.0
