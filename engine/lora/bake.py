"""Bake a LoRA stack into a copy of a diffusers-layout Wan model folder (`python -m engine lora merge`).

Same application code as generation. The copy is written to a temporary sibling folder and renamed
into place at the end, so a failed merge leaves no output and the source is never written.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from engine.catalog import EXPERT_COMPONENT, get_spec
from engine.lora.errors import LoraFormatError
from engine.lora.manager import LoraManager
from engine.types import RequestError, Stack

log = logging.getLogger(__name__)
MERGE_RECORD = "wanstack_merge.json"


def _stored_dtype(folder: Path):
    """The floating dtype most weights of a transformer folder are stored in (kept as is by the merge)."""
    from engine.lora.files import _ST_DTYPES, read_safetensors_header

    counts: Counter[str] = Counter()
    for file in folder.glob("*.safetensors"):
        header, _ = read_safetensors_header(file)
        for key, info in header.items():
            if key != "__metadata__" and info["dtype"].startswith(("F", "BF")):
                counts[info["dtype"]] += 1
    return _ST_DTYPES.get(counts.most_common(1)[0][0]) if counts else None


def merge_model(model_dir: str | Path, stack: Stack, out_dir: str | Path, *, skip_failing: bool = False,
                allow_pickle: bool = False) -> dict[str, Any]:
    from diffusers import WanTransformer3DModel
    from diffusers.utils import logging as diffusers_logging

    from engine.detect import detect

    diffusers_logging.disable_progress_bar()

    src, out = Path(model_dir), Path(out_dir)
    info = detect(src)
    if not info.ok or not info.type:
        raise RequestError(f"--model {model_dir}: {info.reason}")
    spec = get_spec(info.type)
    src_r, out_r = src.resolve(), out.resolve()
    if out_r == src_r or out_r.is_relative_to(src_r) or src_r.is_relative_to(out_r):
        raise RequestError(f"--out {out} overlaps the source model {src}; choose a folder outside it")
    if out.exists():
        raise RequestError(f"--out {out} already exists; choose a new folder (a merge never overwrites)")
    if not stack.entries:
        raise RequestError("no --lora given; pass at least one PATH[=WEIGHT[,APPLIES_TO]]")

    def resolve(file: str) -> Path:
        return Path(file).expanduser().resolve()

    mgr = LoraManager(Path.cwd(), allow_pickle=allow_pickle)
    warnings = mgr.check(spec, stack)
    for entry in stack.entries:  # every file is read and checked before anything is written
        if entry.enabled:
            try:
                mgr.load(resolve(entry.file))
            except (LoraFormatError, OSError):
                if not skip_failing:
                    raise

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.merging-", dir=out.parent))
    report: dict[str, Any] = {"model": str(src), "model_type": spec.type, "out": str(out), "experts": {},
                              "warnings": warnings}
    try:
        components = {EXPERT_COMPONENT[e] for e in spec.experts}
        for item in src.iterdir():
            if item.name in components:
                continue
            if item.is_dir():
                shutil.copytree(item, tmp / item.name, symlinks=False)
            else:
                shutil.copy2(item, tmp / item.name)
        # One expert at a time so a two-expert model never holds both transformers in RAM.
        for expert in spec.experts:
            comp = EXPERT_COMPONENT[expert]
            dtype = _stored_dtype(src / comp)
            module = WanTransformer3DModel.from_pretrained(src, subfolder=comp, torch_dtype=dtype)
            results = mgr.apply({expert: module}, spec, stack, skip_failing=skip_failing, resolve=resolve)
            report["experts"][expert] = results
            module.save_pretrained(tmp / comp, safe_serialization=True)
            mgr.forget({expert: module})
            del module
            gc.collect()
        (tmp / MERGE_RECORD).write_text(json.dumps(
            {"source": str(src_r), "model_type": spec.type, "stack": stack.to_list(),
             "loras": {e: [{k: r[k] for k in ("file", "sha256", "status", "weights")} for r in rs]
                       for e, rs in report["experts"].items()}}, indent=2))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report["loras"] = _combine(report["experts"])
    return report


def _combine(per_expert: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per stack entry across experts: status, weights and coverage per expert."""
    rows: list[dict[str, Any]] = []
    for expert, results in per_expert.items():
        for i, r in enumerate(results):
            if i == len(rows):
                rows.append({"file": r["file"], "sha256": r["sha256"], "status": r["status"], "weights": {},
                             "coverage_by_expert": {}, "warnings": [], "reason": r["reason"]})
            row = rows[i]
            row["weights"].update(r["weights"])
            row["coverage_by_expert"].update(r["coverage_by_expert"])
            row["warnings"] += [w for w in r["warnings"] if w not in row["warnings"]]
            if r["status"] == "applied" or row["status"] not in ("applied", "failed"):
                row["status"] = r["status"] if row["status"] != "failed" else "failed"
    return rows
