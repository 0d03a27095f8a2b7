"""Smoke test of benchmarks/lora_apply.py on a tiny shape: it runs and prints the JSON contract."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.slow
def test_lora_apply_benchmark_small_json():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lora_apply.py"), "--small", "--json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("apply_s", "change_one_s", "remove_s", "roofline_s", "rss_growth_bytes", "lora_bytes"):
        assert isinstance(result[key], (int, float)) and result[key] >= 0, key
    assert "diffusers_load_fuse_s" in result or "diffusers_error" in result
    assert result["change_one_file_reads"] == 0
    assert result["layers_written_apply"] == 20 and result["w0_file_backed"] == 20 and result["w0_copied_bytes"] == 0
