"""The LoRA folder: file paths, hashes, the parsed-file cache (by sha256), inspection and listing."""
from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

from engine.models.catalog import ModelSpec
from engine.lora.errors import LoraFormatError, LoraIncompatibleError
from engine.lora.files import PICKLE_SUFFIXES, check_regular, file_sha256, read_lora_file, read_lora_shapes
from engine.lora.formats import LOW, MAIN, ParsedLora, parse_lora
from engine.lora.inspection import (
    Coverage, check_family, coverage, describe, file_coverage, lora_width, width_of_shapes,
)
from engine.types import RequestError

log = logging.getLogger(__name__)

Resolver = Callable[[str], Path]
LIST_HASH_MAX_BYTES = 4 << 30  # the listing never reads more of one file; larger ones are hashed when used


def slot_for(parsed: ParsedLora, expert: str) -> str:
    """Which part of a file acts on an expert: the `_2` part of a two-expert file goes to low_noise."""
    return LOW if parsed.two_expert and expert == "low_noise" else MAIN


class LoraLibrary:
    """Reads and inspects LoRA files; keeps parsed files (LRU by sha256) and hashes by (path, size, mtime)."""

    def __init__(self, loras_dir: str | Path, *, allow_pickle: bool = False, cache_entries: int = 8,
                 cache_bytes: int = 4 << 30, extra_dirs: dict[str, Path] | None = None):
        self.loras_dir = Path(loras_dir)
        # More LoRA folders, listed and named "<prefix>/<file>" (e.g. "comfyui/x.safetensors" for --comfyui)
        self._extra = {prefix: LoraLibrary(folder, allow_pickle=allow_pickle)
                       for prefix, folder in (extra_dirs or {}).items()}
        self.allow_pickle = allow_pickle
        self.cache_entries = cache_entries
        self.cache_bytes = cache_bytes  # parsed files beyond the pinned ones are dropped past this
        self._pinned: set[str] = set()  # sha256 of the applied stack: kept so a slider change never re-reads
        self._parsed: OrderedDict[str, ParsedLora] = OrderedDict()  # sha256 -> parsed, LRU
        self._sha_by_stat: dict[tuple[str, int, int], str] = {}
        self._describe: dict[str, dict[str, Any]] = {}  # sha256 -> describe() of the header-only parse

    # -- files -----------------------------------------------------------------------------------

    def path_of(self, file: str, resolve: Resolver | None = None) -> Path:
        """The file of a stack entry; entries must stay inside the LoRA folder unless `resolve` is given (CLI)."""
        if resolve is not None:
            return Path(resolve(file))
        prefix, _, rest = str(file).partition("/")
        if rest and prefix in self._extra:
            return self._extra[prefix].path_of(rest)
        p = Path(file)
        if p.is_absolute():
            raise RequestError(f"LoRA file {file} must be relative to the LoRA folder {self.loras_dir}")
        root = self.loras_dir.resolve()
        full = (root / p).resolve()
        if not full.is_relative_to(root):
            raise RequestError(f"LoRA file {file} points outside the LoRA folder {self.loras_dir}; use a path inside it")
        return full

    def sha256_of(self, path: Path, max_bytes: int | None = None) -> str | None:
        """sha256 of a file, cached by (path, size, mtime) so an unchanged file is hashed once.

        With `max_bytes` (listing), a larger file is not read and gives None; it is hashed when used.
        """
        st = check_regular(path)
        key = (str(path), st.st_size, st.st_mtime_ns)
        sha = self._sha_by_stat.get(key)
        if sha is None:
            sha = file_sha256(path, max_bytes)
            if sha is not None:
                self._sha_by_stat[key] = sha
        return sha

    def load(self, path: str | Path) -> ParsedLora:
        """Parsed LoRA (all tensors in RAM), cached by sha256; a cached file is never re-read."""
        path = Path(path)
        if not path.is_file():
            raise LoraFormatError(f"LoRA file {path} not found; check the path or rescan the LoRA folder")
        if path.suffix.lower() in PICKLE_SUFFIXES and not self.allow_pickle:
            read_lora_file(path, allow_pickle=False)  # raises the pickle message
        sha = self.sha256_of(path)
        hit = self._parsed.get(sha)
        if hit is not None:
            self._parsed.move_to_end(sha)
            return hit
        parsed = parse_lora(read_lora_file(path, allow_pickle=self.allow_pickle, sha256=sha))
        self._parsed[sha] = parsed
        self.evict()
        return parsed

    def pin(self, hashes: set[str]) -> None:
        """Keep these files cached (the applied stack) whatever else gets loaded."""
        self._pinned = set(hashes)

    def pin_more(self, hashes: set[str]) -> None:
        self._pinned |= set(hashes)

    def evict(self) -> None:
        """Drop least recently used parsed files (never pinned ones) past the entry/byte budget."""
        def over() -> bool:
            total = sum(p.nbytes() for p in self._parsed.values())
            return len(self._parsed) > self.cache_entries or total > self.cache_bytes

        for sha in list(self._parsed):
            if not over():
                break
            if sha not in self._pinned:
                del self._parsed[sha]

    # -- inspection ------------------------------------------------------------------------------

    def inspect(self, path: str | Path, model=None) -> dict[str, Any]:
        """Format, rank, alpha, family, experts; with `model` (a listed ModelInfo of any source: diffusers
        folder, recipe, --comfyui) also coverage per expert and compatibility, from the model's headers."""
        p = Path(path)
        if not p.is_absolute() and not p.exists():
            p = self.path_of(str(path))
        parsed = self.load(p)
        info = describe(parsed, p.name)
        if model is None:
            return info
        from engine.models.catalog import get_spec
        from engine.models.experts import expert_shapes

        spec = get_spec(model.type) if model.ok and model.type else None
        if spec is None:
            raise RequestError(f"model {model.id}: {model.reason or 'not a usable Wan model'}")
        shapes = expert_shapes(model)
        info["model"] = {"id": model.id, "path": str(model.path), "type": spec.type, "label": spec.label,
                         "source": model.source, "storage": model.storage, "experts": list(spec.experts),
                         "width": width_of_shapes(next(iter(shapes.values())))}
        info.update(self._compat(parsed, spec, shapes, p.name))
        return info

    @staticmethod
    def _compat(parsed: ParsedLora, spec: ModelSpec, shapes: dict[str, dict], name: str) -> dict[str, Any]:
        width = width_of_shapes(next(iter(shapes.values()))) or spec.memory.width
        out: dict[str, Any] = {"compatible": True, "reason": ""}
        try:
            check_family(parsed, width, spec.label, name)
        except LoraIncompatibleError as e:
            out.update(compatible=False, reason=str(e))
        per: dict[str, Coverage] = {}
        for expert, sh in shapes.items():
            per[expert] = coverage(parsed, slot_for(parsed, expert), sh)
        used = {slot_for(parsed, e) for e in shapes}
        out["coverage_by_expert"] = {e: c.to_dict() for e, c in per.items()}
        out["coverage"] = file_coverage(parsed, per, used, None if spec.dual_expert else
                                        "low-noise part of a two-expert file; this model has one expert")
        if out["compatible"] and out["coverage"]["applied"] == 0:
            out.update(compatible=False, reason=f"{name}: none of its {len(parsed.keys)} keys match a {spec.label} layer")
        return out

    def list_loras(self, spec: ModelSpec | None = None) -> list[dict[str, Any]]:
        """Every *.safetensors under the LoRA folder (relative paths), inspected from headers only."""
        rows: list[dict[str, Any]] = []
        for prefix, sub in self._extra.items():
            rows += [{**row, "file": f"{prefix}/{row['file']}"} for row in sub.list_loras(spec)]
        if not self.loras_dir.is_dir():
            return rows
        root = self.loras_dir.resolve()
        for path in sorted(self.loras_dir.rglob("*.safetensors")):
            rel = path.relative_to(self.loras_dir).as_posix()
            row: dict[str, Any] = {"file": rel}
            try:
                check_regular(path)
                if not path.resolve().is_relative_to(root):
                    raise LoraFormatError(f"{rel} is a link to a file outside the LoRA folder; copy the file in instead")
                sha = self.sha256_of(path, max_bytes=LIST_HASH_MAX_BYTES)
                st = path.stat()
                cache_key = sha or f"unhashed:{path}:{st.st_size}:{st.st_mtime_ns}"
                info = self._describe.get(cache_key)
                if info is None:
                    parsed = parse_lora(read_lora_shapes(path, sha256=sha or ""))
                    info = describe(parsed, path.name)
                    info["_width"] = lora_width(parsed)
                    self._describe[cache_key] = info
                row.update({k: v for k, v in info.items() if not k.startswith("_")}, file=rel, ok=True,
                           sha256=sha)
                row["compatible"], row["reason"] = self._list_compat(info, spec)
            except (LoraFormatError, LoraIncompatibleError, OSError) as e:
                row.update(ok=False, compatible=False, reason=str(e))
            except Exception as e:  # noqa: BLE001 - one odd file must never break the listing of the others
                log.exception("reading %s for the LoRA list failed", rel)
                row.update(ok=False, compatible=False, reason=f"{rel} could not be read ({type(e).__name__}: {e})")
            rows.append(row)
        return rows

    @staticmethod
    def _list_compat(info: dict[str, Any], spec: ModelSpec | None) -> tuple[bool, str]:
        if spec is None:
            return True, ""
        width = info.get("_width")
        if width is not None and width != spec.memory.width:
            return False, (f"made for {info['family']} (width {width}); this model is {spec.label} "
                           f"(width {spec.memory.width})")
        notes = []
        if info.get("image_keys") and spec.task == "t2v":
            notes.append("its image cross-attention keys are skipped on this text-to-video model")
        if info.get("two_expert") and not spec.dual_expert:
            notes.append("two-expert file: only its high-noise part acts on this single-expert model")
        return True, "; ".join(notes)
