"""Model recipes: a JSON file in models/ naming a model's components (DESIGN.md "Model sources"), and the
assembly shared with `--comfyui`: missing parts are found in the ComfyUI tree or in diffusers Wan folders,
or the model is listed as unusable with the reason.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from engine.models.identify import TEXT_ENCODER, TRANSFORMER, VAE, FileKind, classify_file, storage_label
from engine.types import RequestError

log = logging.getLogger(__name__)
COMPONENTS = ("transformer", "transformer_2", "text_encoder", "vae", "tokenizer", "image_encoder")
VAE_OF = {"wan2.2-ti2v-5b": "wan2.2"}  # every other type uses the Wan 2.1 VAE
VAE_FILE_HINT = {"wan2.1": "wan_2.1_vae.safetensors", "wan2.2": "wan2.2_vae.safetensors"}


@dataclass(frozen=True)
class Recipe:
    transformer: str
    name: str = ""
    transformer_2: str | None = None
    text_encoder: str | None = None
    vae: str | None = None
    tokenizer: str | None = None
    image_encoder: str | None = None
    type: str | None = None
    schema: int = 1


def is_recipe_file(path: Path) -> bool:
    """A JSON object with a `transformer` key (other JSON files in models/ are not recipes)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "transformer" in data


def read_recipe(path: str | Path) -> Recipe:
    """Parse and check a recipe; component paths come back absolute (relative ones are taken from the file's folder)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise RequestError(f"recipe {path.name} is not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise RequestError(f"recipe {path.name} must be a JSON object")
    if data.get("schema", 1) != 1:
        raise RequestError(f"recipe {path.name}: schema {data.get('schema')!r} is not supported (use 1)")
    unknown = sorted(set(data) - set(COMPONENTS) - {"schema", "name", "type"})
    if unknown:
        raise RequestError(f"recipe {path.name}: unknown field(s) {unknown}; fields are schema, name, type, {', '.join(COMPONENTS)}")
    if not isinstance(data.get("transformer"), str) or not data["transformer"]:
        raise RequestError(f"recipe {path.name}: `transformer` must name a .safetensors/.gguf file or a diffusers folder")
    parts = {}
    for key in COMPONENTS:
        value = data.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or not value:
            raise RequestError(f"recipe {path.name}: `{key}` must be a path or null, not {value!r}")
        p = Path(value).expanduser()
        parts[key] = str(p if p.is_absolute() else (path.parent / p).resolve())
    mtype = data.get("type")
    if mtype is not None:
        from engine.models.catalog import get_spec

        get_spec(mtype)
    return Recipe(name=str(data.get("name") or path.stem), type=mtype, **parts)


# ---- parts found around a model ------------------------------------------------------------------

@dataclass(frozen=True)
class Part:
    path: str
    kind: str
    arch: str | None = None  # vae: wan2.1 / wan2.2
    demo: bool = False
    text_dim: int = 0
    storage: str = ""
    origin: str = ""  # the folder listing where it was found, for messages


@dataclass
class Pool:
    """Text encoders, VAEs, image encoders and tokenizers that models may borrow."""

    text_encoders: list[Part] = field(default_factory=list)
    vaes: list[Part] = field(default_factory=list)
    image_encoders: list[Part] = field(default_factory=list)
    tokenizers: list[Part] = field(default_factory=list)
    where: str = ""  # how to name the place in a reason: "vae/ of /x/ComfyUI/models"


def diffusers_pool(models_dir: Path | None) -> Pool:
    """Components of every diffusers Wan folder in models_dir (text_encoder/, vae/, tokenizer/, image_encoder/)."""
    pool = Pool()
    if models_dir is None or not Path(models_dir).is_dir():
        return pool
    for folder in sorted(Path(models_dir).iterdir()):
        if not (folder / "model_index.json").is_file():
            continue
        demo = (folder / "wanstack_demo.json").is_file()
        te = folder / "text_encoder" / "config.json"
        if te.is_file():
            d = _json(te).get("d_model", 0)
            pool.text_encoders.append(Part(str(te.parent), TEXT_ENCODER, "umt5", demo, int(d), "", str(folder)))
        vae = folder / "vae" / "config.json"
        if vae.is_file():
            z = _json(vae).get("z_dim", 16)
            pool.vaes.append(Part(str(vae.parent), VAE, "wan2.2" if z == 48 else "wan2.1", demo, 0, "", str(folder)))
        if (folder / "tokenizer").is_dir():
            pool.tokenizers.append(Part(str(folder / "tokenizer"), "tokenizer", None, demo, 0, "", str(folder)))
        if (folder / "image_encoder" / "config.json").is_file():
            pool.image_encoders.append(Part(str(folder / "image_encoder"), "clip_vision", None, demo, 0, "", str(folder)))
    return pool


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def part_of_file(path: Path, kind: FileKind, origin: str) -> Part:
    return Part(str(path), kind.kind, kind.arch, kind.demo, kind.text_dim, kind.storage, origin)


# ---- assembly --------------------------------------------------------------------------------------

def _component(path: str, expected: str) -> tuple[str, FileKind | None]:
    """A recipe path may be a single file, a diffusers component folder, or a whole diffusers model folder."""
    p = Path(path)
    if p.is_dir():
        if (p / "model_index.json").is_file() and (p / expected).is_dir():
            p = p / expected
        return str(p), None
    if not p.is_file():
        raise RequestError(f"{expected} {p} does not exist")
    return str(p), classify_file(p)


def _subfolder(path: str | None, component: str) -> str | None:
    """A whole diffusers model folder named for one component means its subfolder of that name."""
    if path and (Path(path) / "model_index.json").is_file() and (Path(path) / component).is_dir():
        return str(Path(path) / component)
    return path


def assemble(model_id: str, source: str, where: str, parts: dict[str, str | None], declared_type: str | None,
             pools: list[Pool]):
    """A ModelInfo for these parts; missing ones are taken from the pools or named in the reason."""
    from engine.models.catalog import CATALOG
    from engine.models.detect import ModelInfo

    parts = {k: _subfolder(v, k) for k, v in parts.items()}

    files: dict[str, str] = {}

    def bad(reason: str, mtype: str | None = None, storage: str = "", experts: int = 1):
        return ModelInfo(model_id, where, mtype, False, reason, bool(mtype and mtype.startswith("demo-")), "",
                         source, storage, storage_label(storage, experts) if storage else "", files)

    try:
        tpath, tkind = _component(parts["transformer"], "transformer")
        files["transformer"] = tpath
        kinds = [tkind]
        if parts.get("transformer_2"):
            t2, t2kind = _component(parts["transformer_2"], "transformer_2")
            files["transformer_2"] = t2
            kinds.append(t2kind)
    except RequestError as e:
        return bad(str(e))
    arch, demo, storage, text_dim = _transformer_facts(tpath, tkind, declared_type)
    if isinstance(arch, Exception):
        return bad(str(arch))
    for k in kinds:
        if k is not None and k.reason:
            return bad(k.reason, None, k.storage)
        if k is not None and k.kind != TRANSFORMER:
            return bad(f"{Path(k.path).name} is a {k.kind}, not a transformer")
    mtype = declared_type or (f"demo-{arch}" if demo else arch)
    if mtype not in CATALOG:
        return bad(f"type {mtype!r} is not a known model type")
    spec = CATALOG[mtype]
    experts = len(kinds)
    if spec.dual_expert and experts != 2:
        k = kinds[0]
        side = (k.expert if k else None) or "high_noise"
        other = "low_noise" if side == "high_noise" else "high_noise"
        return bad(f"{spec.label} needs two experts: no {other} partner for {Path(tpath).name}", mtype, storage, experts)
    if not spec.dual_expert and experts != 1:
        return bad(f"{spec.label} has one expert, but two transformers are named", mtype, storage, experts)
    if len(kinds) == 2 and kinds[0] and kinds[1]:
        if (kinds[0].arch, kinds[0].demo) != (kinds[1].arch, kinds[1].demo):
            return bad(f"{Path(files['transformer']).name} and {Path(files['transformer_2']).name} are different models",
                       mtype, storage, experts)
        if kinds[0].expert == "low_noise" and kinds[1].expert == "high_noise":
            files["transformer"], files["transformer_2"] = files["transformer_2"], files["transformer"]
    need_vae = VAE_OF.get(spec.type.removeprefix("demo-"), "wan2.1")
    # text encoder
    te = parts.get("text_encoder")
    if te:
        files["text_encoder"] = te
    else:
        cand = _pick([p for pool in pools for p in pool.text_encoders], demo, lambda p: not text_dim or p.text_dim == text_dim)
        if cand is None:
            where_te = " or ".join(p.where for p in pools if p.where) or "models/"
            return bad(f"no umt5-xxl text encoder (umt5_xxl_fp8_e4m3fn_scaled.safetensors or umt5_xxl_fp16.safetensors) "
                       f"in {where_te}", mtype, storage, experts)
        files["text_encoder"] = cand.path
    vae = parts.get("vae")
    if vae:
        files["vae"] = vae
    else:
        cand = _pick([p for pool in pools for p in pool.vaes if p.arch == need_vae], demo)
        if cand is None:
            return bad(f"no Wan {need_vae[3:]} VAE ({VAE_FILE_HINT[need_vae]}) in {_vae_where(pools)}", mtype, storage, experts)
        files["vae"] = cand.path
    if spec.memory.image_encoder_params:
        ie = parts.get("image_encoder")
        if ie:
            files["image_encoder"] = ie
        else:
            cand = _pick([p for pool in pools for p in pool.image_encoders], demo)
            if cand is None:
                return bad(f"{spec.label} needs the CLIP image encoder (clip_vision_h.safetensors) in clip_vision/",
                           mtype, storage, experts)
            files["image_encoder"] = cand.path
    tok = parts.get("tokenizer") or find_tokenizer(files["text_encoder"], pools, demo)
    if tok is None:
        return bad(f"no tokenizer for {Path(files['text_encoder']).name}: put the umt5-xxl tokenizer folder "
                   "(tokenizer.json or spiece.model) next to it as tokenizer/, or a diffusers Wan folder in models/, "
                   "or name one in a recipe's `tokenizer`", mtype, storage, experts)
    files["tokenizer"] = tok
    label = spec.label
    return ModelInfo(model_id, where, mtype, True, "", spec.demo, label, source, storage,
                     storage_label(storage, experts), files)


def _vae_where(pools: list[Pool]) -> str:
    places = [p.where for p in pools if p.where]
    return " or ".join(places).replace("text_encoders/", "vae/") if places else "models/"


def _pick(cands: list[Part], demo: bool, ok=lambda p: True) -> Part | None:
    fitting = [c for c in cands if c.demo == demo and ok(c)]
    return fitting[0] if fitting else None


def _transformer_facts(path: str, kind: FileKind | None, declared: str | None):
    """(arch, demo, storage, text_dim) of a transformer file or diffusers transformer folder."""
    if kind is not None:
        if kind.arch is None:
            return RequestError(kind.reason or f"{Path(path).name}: not a Wan transformer"), False, "", 0
        return kind.arch, kind.demo, kind.storage, kind.text_dim
    cfg = _json(Path(path) / "config.json")
    if not cfg:
        return RequestError(f"{path}: no config.json (not a diffusers transformer folder)"), False, "", 0
    from engine.models.detect import _folder_storage, classify

    try:
        arch = classify({}, cfg, "transformer_2" in Path(path).name)
    except ValueError as e:
        return e, False, "", 0
    demo = (Path(path).parent / "wanstack_demo.json").is_file()
    return arch, demo, _folder_storage(Path(path)), int(cfg.get("text_dim", 0))


def find_tokenizer(text_encoder: str, pools: list[Pool], demo: bool) -> str | None:
    """The tokenizer for a text encoder: embedded spiece_model, a tokenizer/ next to it, or a pool's tokenizer/."""
    te = Path(text_encoder)
    if te.is_file():
        from engine.models.headers import read_header

        try:
            if "spiece_model" in read_header(te).tensors:
                return f"{te}#spiece_model"
        except RequestError:
            pass
        # ComfyUI-style tokenizer/ beside it; Wan2GP keeps the tokenizer files in the text encoder's own folder
        for cand in (te.parent / "tokenizer", te.parent / f"{te.stem}_tokenizer", te.parent):
            if (cand / "tokenizer.json").is_file() or (cand / "spiece.model").is_file():
                return str(cand)
    elif (te.parent / "tokenizer").is_dir():
        return str(te.parent / "tokenizer")
    cand = _pick([p for pool in pools for p in pool.tokenizers], demo)
    return cand.path if cand else None


def recipe_info(path: str | Path, *, models_dir: Path | None = None, comfyui_dir: str | Path | None = None):
    """ModelInfo of a recipe file (id = file name without .json)."""
    from engine.models.detect import ModelInfo

    path = Path(path)
    try:
        recipe = read_recipe(path)
    except RequestError as e:
        return ModelInfo(path.stem, str(path), None, False, str(e), source="recipe")
    pools = [diffusers_pool(models_dir or path.parent)]
    if comfyui_dir is not None:
        from engine.models.comfyui import comfyui_pool

        pools.insert(0, comfyui_pool(Path(comfyui_dir)))
    parts = {k: getattr(recipe, k) for k in COMPONENTS}
    return assemble(path.stem, "recipe", str(path), parts, recipe.type, pools)
