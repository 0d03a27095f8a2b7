"""Load: 30 concurrent /generate calls against an app with a queue of 3. Accepted jobs end in valid MP4s,
the rest get "queue full", the server keeps answering, and its RSS comes back within 10%."""
from __future__ import annotations

import json
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from engine.run.video import probe_video

pytestmark = pytest.mark.slow
MODEL = "demo-wan2.1-t2v-1.3b"
JOBS = 30


def test_thirty_concurrent_generates(hostile_app):
    from gradio_client import Client

    url = hostile_app["url"]
    client = Client(url, verbose=False)
    args = dict(model=MODEL, prompt="load", negative_prompt="", image=None, stack="", width=64, height=64, frames=9,
                steps=2)
    # warm up to the steady state before the baseline: the pipeline loaded, and one burst of the same size
    # through the queue (its "queue full" path, worker threads, their malloc arenas and caches exist from then
    # on; a smaller warm-up burst left the measured one +12% in a whole-suite run)
    client.predict(**args, seed=1, api_name="/generate")
    for job in [client.submit(**args, seed=10 + i, api_name="/generate") for i in range(JOBS)]:
        try:
            job.result(timeout=600)
        except Exception:  # noqa: BLE001 - "queue full" is expected here
            pass
    client.predict(**args, seed=2, api_name="/generate")
    proc = psutil.Process(hostile_app["proc"].pid)
    rss_before = proc.memory_info().rss
    split_before = _rss_split(proc.pid)

    latencies: list[float] = []
    stop = threading.Event()

    def ping():
        while not stop.is_set():
            t0 = time.perf_counter()
            urllib.request.urlopen(url + "/gradio_api/info", timeout=30).read()
            latencies.append(time.perf_counter() - t0)
            time.sleep(0.2)

    pinger = threading.Thread(target=ping, daemon=True)
    pinger.start()
    t0 = time.perf_counter()
    jobs = [client.submit(**args, seed=100 + i, api_name="/generate") for i in range(JOBS)]
    ok, full, other = [], [], []
    for job in jobs:
        try:
            path, summary = job.result(timeout=600)
            ok.append((path, json.loads(summary)))
        except Exception as e:  # noqa: BLE001 - gradio_client raises its own types; the message is the contract
            (full if "queue is full" in str(e).lower() else other).append(str(e))
    wall = time.perf_counter() - t0
    stop.set()
    pinger.join(5)
    assert not other, other[:3]
    assert ok and full and len(ok) + len(full) == JOBS
    for path, summary in ok:
        p = probe_video(path)
        assert (p.codec, p.width, p.height, p.frames) == ("h264", 64, 64, 9) and summary["frames"] == 9
    assert latencies and max(latencies) < 10, max(latencies)  # 2 shared cores: generous, the figure is reported
    client.predict(**args, seed=3, api_name="/generate")  # the same steady state as the baseline
    time.sleep(1)
    rss_after = proc.memory_info().rss
    report = {"jobs": JOBS, "accepted": len(ok), "queue_full": len(full), "wall_s": round(wall, 1),
              "max_ping_s": round(max(latencies), 3), "pings": len(latencies),
              "rss_before_mib": round(rss_before / 2**20, 1), "rss_after_mib": round(rss_after / 2**20, 1),
              # anonymous (heap) vs file-backed (mapped weights, libraries) pages: which part moved, if one did
              "rss_split_before_mib": split_before, "rss_split_after_mib": _rss_split(proc.pid)}
    out = Path(__file__).resolve().parents[2] / "test-artifacts" / "reliability"
    out.mkdir(parents=True, exist_ok=True)
    (out / "load.json").write_text(json.dumps(report))
    assert abs(rss_after - rss_before) <= 0.10 * rss_before, report


def _rss_split(pid: int) -> dict[str, float]:
    """RssAnon / RssFile / RssShmem of a process, in MiB (Linux /proc)."""
    out = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                key, value = line.split(":", 1)
                out[key] = round(int(value.split()[0]) / 1024, 1)
    return out
