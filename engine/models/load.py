"""Build a Wan pipeline from a recipe's components: single files (.safetensors in any storage, .gguf) or
diffusers folders, with configs shipped in engine/models/configs/ (or carried by WanStack's own test files),
so nothing touches the network.
"""
from __future__ import annotations

import functools
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.models.catalog import CATALOG, ModelSpec
from engine.types import RequestError

log = logging.getLogger(__name__)
CONFIGS = Path(__file__).parent / "configs"
# Modules whose fp8 weights are dequantized at load: diffusers' Wan condition embedder casts its input to
# its first weight's dtype (which must not be fp8), and they are a tiny share of the bytes.
_DEQUANT_AT_LOAD = ("condition_embedder.",)


def shipped_config(name: str) -> dict:
    with open(CONFIGS / f"{name}.json", encoding="utf-8") as f:
        return json.load(f)


@dataclass
class Loaded:
    """A pipeline built from a recipe, and where each expert's weights live for LoRA W0 re-reads."""

    pipe: Any
    sources: dict[str, Any] = field(default_factory=dict)  # component ("transformer", "transformer_2") -> WeightSource
    storage: dict[str, str] = field(default_factory=dict)  # component -> storage


def build_pipeline(info, dtype) -> Loaded:
    """The pipeline of a recipe / ComfyUI ModelInfo, on the CPU, transformers and text encoder in `dtype`."""
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline

    spec = CATALOG[info.type]
    files = info.files
    out = Loaded(pipe=None)
    parts: dict[str, Any] = {}
    for comp in ("transformer", "transformer_2"):
        if files.get(comp):
            parts[comp], source, storage = load_transformer(files[comp], spec, dtype)
            if source is not None:
                out.sources[comp] = source
            out.storage[comp] = storage
    parts.setdefault("transformer_2", None)
    parts["text_encoder"] = load_text_encoder(files["text_encoder"], dtype)
    parts["tokenizer"] = load_tokenizer(files["tokenizer"], parts["text_encoder"])
    parts["vae"] = load_vae(files["vae"], spec)
    sched = shipped_config("scheduler")
    sched.pop("_class_name", None)
    sched["flow_shift"] = spec.shift
    parts["scheduler"] = UniPCMultistepScheduler(**sched)
    kw = dict(boundary_ratio=spec.boundary_ratio, expand_timesteps=spec.task == "ti2v")
    if spec.pipeline_class == "WanImageToVideoPipeline":
        enc, proc = (load_image_encoder(files["image_encoder"]) if files.get("image_encoder") else (None, None))
        out.pipe = WanImageToVideoPipeline(image_encoder=enc, image_processor=proc, **parts, **kw)
    else:
        out.pipe = WanPipeline(**parts, **kw)
    for module in (parts["transformer"], parts["transformer_2"], parts["text_encoder"], parts["vae"]):
        if module is not None:
            own_aligned(module)
    return out


def weight_files(info) -> list[Path]:
    """The .safetensors files loading a model reads: each component folder's (its index's shards, or its one
    unsharded file) for a diffusers folder; a recipe's single files and component folders. GGUF files are
    checked by their own reader."""
    files: list[Path] = []
    if info.source == "diffusers":
        root = Path(info.path)
        try:
            index = json.loads((root / "model_index.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return []  # the loader says what is wrong with the folder itself
        for name, value in index.items() if isinstance(index, dict) else ():
            if not name.startswith("_") and isinstance(value, list) and (root / name).is_dir():
                files += _component_files(root / name)
        return files
    for value in (info.files or {}).values():
        if not value:
            continue
        p = Path(str(value).removesuffix("#spiece_model"))
        if p.is_dir():
            files += _component_files(p)
        elif p.suffix == ".safetensors":
            files.append(p)
    return list(dict.fromkeys(files))


def _component_files(folder: Path) -> list[Path]:
    """The weight files diffusers / transformers load from one component folder (no variants)."""
    for stem in ("diffusion_pytorch_model", "model"):
        index = folder / f"{stem}.safetensors.index.json"
        if index.is_file():
            try:
                shards = json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                raise RequestError(f"{index} is damaged (no weight_map); download it again") from None
            return [folder / s for s in dict.fromkeys(shards) if isinstance(s, str)]
        if (folder / f"{stem}.safetensors").is_file():
            return [folder / f"{stem}.safetensors"]
    return []


def check_weight_files(info) -> None:
    """RequestError naming the first weight file of the model that is missing, cut short or not a safetensors
    file, with the sizes and the fix; reads headers only."""
    from engine.models.headers import check_complete

    for path in weight_files(info):
        check_complete(path)


def own_aligned(module) -> None:
    """Give every CPU parameter and buffer its own 64-byte aligned storage.

    CPU kernels pick code paths by alignment, so the same weights memory-mapped from shards and copied from
    a single file can differ in the last bits; loading through either path then gives identical frames.
    """
    import torch

    with torch.no_grad():
        for sub in module.modules():
            for store in (sub._parameters, sub._buffers):
                for key, t in list(store.items()):
                    if t is None or t.device.type != "cpu" or t.data_ptr() % 64 == 0:
                        continue
                    clone = t.data.clone()
                    if isinstance(t, torch.nn.Parameter):
                        t.data = clone
                    else:
                        store[key] = clone


# ---- transformer -------------------------------------------------------------------------------------

def _type_config(path: Path, spec: ModelSpec, header) -> dict:
    from engine.models.headers import embedded_config

    cfg = embedded_config(header)
    if cfg is None:
        if spec.demo:
            raise RequestError(f"{path.name}: a demo-size transformer without its config (wanstack_config metadata)")
        cfg = shipped_config(f"transformer-{spec.type}")
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def load_transformer(path: str, spec: ModelSpec, dtype):
    """(module, WeightSource or None, storage) for a transformer file or diffusers transformer folder."""
    from diffusers import WanTransformer3DModel

    p = Path(path)
    if p.is_dir():
        from engine.run.generate import _dtype_kw

        module = WanTransformer3DModel.from_pretrained(p, **_dtype_kw(dtype))
        from engine.models.detect import _folder_storage

        return module.eval(), None, _folder_storage(p)
    from engine.models.headers import read_header

    header = read_header(p)
    if header.format == "gguf":
        return _load_gguf(p, spec, dtype, header)
    return _load_safetensors_transformer(p, spec, dtype, header)


def _load_safetensors_transformer(p: Path, spec: ModelSpec, dtype, header):
    import torch
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    from engine.lora.merge import WeightSource
    from engine.models.fp8 import make_fp8
    from engine.models.identify import storage_of
    from engine.models.keys import is_aux, transformer_name_map

    storage = storage_of(header, [n for n in header.tensors if not is_aux(n)])
    config = _type_config(p, spec, header)
    with init_empty_weights():
        model = WanTransformer3DModel.from_config(config)
    names = transformer_name_map(header.names())
    source = WeightSource(p, names)
    # as from_pretrained does for any dtype: the time embedder, modulation tables and norms stay fp32
    keep_fp32 = tuple(model._keep_in_fp32_modules or ()) if dtype != torch.float32 else ()
    _fill(model, source, p, dtype, keep_fp32, fp8_ok=True, make_fp8=make_fp8)
    return model.eval(), source, storage


def _fill(model, source, path: Path, dtype, keep_fp32: tuple[str, ...] = (), *, fp8_ok: bool = False, make_fp8=None) -> None:
    """Assign every parameter of a meta-initialised `model` from `source` (missing names raise). A parameter
    tied to others (one Parameter under several modules) is read once and stays tied."""
    import torch

    modules = dict(model.named_modules())
    owners: dict[int, list] = {}
    for sub in model.modules():
        for key, p in sub._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((sub, key))
    missing = [n for n, _ in model.named_parameters() if n not in source.index]
    if missing:
        raise RequestError(f"{path.name} lacks {len(missing)} tensor(s) of this model, e.g. {missing[0]}; "
                           "it is not a complete file of the detected type")
    for name, param in list(model.named_parameters()):
        mod_name, _, leaf = name.rpartition(".")
        module = modules[mod_name]
        stored = source.stored_dtype(name)
        shape = source.shape(name)
        if stored is None or not stored.is_floating_point:  # int8 / 4-bit containers: read as numbers they are garbage
            raise RequestError(f"{path.name}: {name} is stored as {source.index[name][1]}, a quantized layout WanStack "
                               "does not read; use the bf16/fp16, fp8 (per-tensor scales) or GGUF version of this file")
        if tuple(shape) != tuple(param.shape):
            raise RequestError(f"{path.name}: tensor for {name} has shape {list(shape)}, the config expects "
                               f"{list(param.shape)}; the file does not match its detected type {model.__class__.__name__}")
        keep = fp8_ok and stored == torch.float8_e4m3fn and isinstance(module, torch.nn.Linear) and leaf == "weight" \
            and not name.startswith(_DEQUANT_AT_LOAD)
        if keep:
            t = source.read(name, stored)
        else:
            target = torch.float32 if any(k in name.split(".") for k in keep_fp32) else dtype
            t = source.read(name, target)
        new = torch.nn.Parameter(t, requires_grad=False)
        for owner, key in owners.get(id(param), [(module, leaf)]):
            owner._parameters[key] = new
        if keep:
            make_fp8(module, source.scales.get(name, 1.0))


def _load_gguf(p: Path, spec: ModelSpec, dtype, header):
    from diffusers import GGUFQuantizationConfig, WanTransformer3DModel

    from engine.models.identify import storage_of

    storage = storage_of(header, list(header.tensors))
    config = _type_config(p, spec, header)
    with tempfile.TemporaryDirectory(prefix="wanstack-config-") as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps({"_class_name": "WanTransformer3DModel", **config}))
        model = WanTransformer3DModel.from_single_file(
            str(p), config=tmp, quantization_config=GGUFQuantizationConfig(compute_dtype=dtype),
            torch_dtype=dtype, local_files_only=True)
    return model.eval(), None, storage


# ---- text encoder, tokenizer, VAE, image encoder -------------------------------------------------------

def load_text_encoder(path: str, dtype):
    """umt5-xxl from a transformers folder or a single file (ComfyUI T5 layout or original Wan layout, any
    storage). An fp8 file's Linear weights stay fp8 and are upcast per call (about half of bf16); the token
    embedding, norms and relative position tables are read in `dtype`."""
    from transformers import UMT5EncoderModel

    p = Path(path)
    if p.is_dir():
        return UMT5EncoderModel.from_pretrained(p, dtype=dtype).eval()
    from engine.lora.merge import WeightSource
    from engine.models.fp8 import make_fp8
    from engine.models.headers import embedded_config, read_header
    from engine.models.keys import t5_name_map

    header = read_header(p)
    if header.format != "safetensors":
        raise RequestError(f"{p.name}: the text encoder must be a .safetensors file or a transformers folder")
    names = t5_name_map(header.names())
    cfg = embedded_config(header) or shipped_config("umt5-xxl")
    shared = header.tensors.get(names.get("shared.weight", ""))
    if shared is None:
        raise RequestError(f"{p.name} has no token embedding (shared.weight / token_embedding.weight); not a umt5 file")
    if list(shared.shape) != [cfg["vocab_size"], cfg["d_model"]]:
        raise RequestError(f"{p.name}: token embedding {list(shared.shape)} is not umt5-xxl's "
                           f"[{cfg['vocab_size']}, {cfg['d_model']}]")
    model = empty_text_encoder(cfg)
    keep_fp32 = _transformers_keep_fp32(model, dtype)
    _fill(model, WeightSource(p, names), p, dtype, keep_fp32, fp8_ok=True, make_fp8=make_fp8)
    _upcast_fp8_wo(model, dtype, keep_fp32)
    return model.eval()


def empty_text_encoder(cfg: dict):
    """A umt5 encoder of config `cfg` on the meta device, as a single file fills it: its input embedding is
    `shared` (one Parameter), as from_pretrained ties them. transformers 5 ties them only when the config says
    tie_word_embeddings (umt5-xxl's does not); a file holds one embedding, not a second copy (2.1 GB in bf16)."""
    from accelerate import init_empty_weights
    from transformers import UMT5Config, UMT5EncoderModel

    with init_empty_weights():
        model = UMT5EncoderModel(UMT5Config(**{k: v for k, v in cfg.items() if not k.startswith("_")}))
    model.encoder.embed_tokens.weight = model.shared.weight
    return model


def _transformers_keep_fp32(model, dtype) -> tuple[str, ...]:
    """The modules transformers' from_pretrained keeps in fp32 at `dtype` (PreTrainedModel._get_dtype_plan in
    transformers 5): `_keep_in_fp32_modules` only at fp16 (umt5's `wo`: its activations overflow fp16),
    `_keep_in_fp32_modules_strict` at fp16 and bf16. Single files follow it so they load like a folder."""
    import torch

    keep: set[str] = set()
    if dtype == torch.float16:
        keep |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    if dtype in (torch.float16, torch.bfloat16):
        keep |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    return tuple(sorted(keep))


def _upcast_fp8_wo(model, dtype, keep_fp32: tuple[str, ...]) -> None:
    """Give each umt5 feed-forward whose `wo` stayed fp8 a forward that does not cast its activations to
    `wo.weight.dtype` (transformers does, which would turn them into fp8); they go to the dtype `wo` would have
    been loaded in instead, and the fp8 weight is upcast to that inside `wo`."""
    import torch
    from transformers.models.umt5.modeling_umt5 import UMT5DenseActDense, UMT5DenseGatedActDense

    from engine.models.fp8 import fp8_linear_class

    for module in model.modules():
        if type(module) in (UMT5DenseActDense, UMT5DenseGatedActDense) and isinstance(module.wo, fp8_linear_class()):
            module.__class__ = _fp8_feed_forward_class(type(module))
            module.wo_dtype = torch.float32 if "wo" in keep_fp32 else dtype


@functools.cache
def _fp8_feed_forward_class(base):
    class Fp8FeedForward(base):
        """transformers' UMT5DenseGatedActDense / UMT5DenseActDense forward (5.x) with the activations cast to
        `wo_dtype` instead of `wo.weight.dtype`; tests/engine/models/test_te_fp8.py holds it to the original."""

        def forward(self, hidden_states):
            if hasattr(self, "wi_0"):  # gated (umt5-xxl: gated-gelu)
                h = self.act(self.wi_0(hidden_states)) * self.wi_1(hidden_states)
            else:
                h = self.act(self.wi(hidden_states))
            h = self.dropout(h)
            if h.dtype != self.wo_dtype:
                h = h.to(self.wo_dtype)
            return self.wo(h)

    Fp8FeedForward.__name__ = Fp8FeedForward.__qualname__ = f"Fp8{base.__name__}"
    return Fp8FeedForward


def load_tokenizer(path: str, text_encoder=None):
    """A tokenizer folder (tokenizer.json or spiece.model), or `FILE#spiece_model` (embedded in a ComfyUI file)."""
    from transformers import AutoTokenizer

    if path.endswith("#spiece_model"):
        from engine.models.spiece import tokenizer_from_embedded

        tok = tokenizer_from_embedded(Path(path[: -len("#spiece_model")]))
    else:
        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise RequestError(f"tokenizer {path} could not be read ({e}); put the umt5-xxl tokenizer "
                               "(tokenizer.json) there") from None
    if text_encoder is not None and len(tok) > text_encoder.config.vocab_size:
        raise RequestError(f"tokenizer {path} has {len(tok)} tokens but the text encoder only {text_encoder.config.vocab_size}; "
                           "it belongs to another text encoder")
    return tok


def load_vae(path: str, spec: ModelSpec):
    """Wan 2.1 / 2.2 VAE in fp32 (as the Wan docs run it), from a diffusers folder or an original-layout file."""
    import torch
    from diffusers import AutoencoderKLWan

    p = Path(path)
    if p.is_dir():
        from engine.run.generate import _dtype_kw

        return AutoencoderKLWan.from_pretrained(p, **_dtype_kw(torch.float32)).eval()
    from accelerate import init_empty_weights

    from engine.lora.merge import WeightSource
    from engine.models.headers import embedded_config, read_header
    from engine.models.keys import vae_name_map

    header = read_header(p)
    cfg = embedded_config(header)
    if cfg is None:
        z = header.tensors.get("conv1.weight") or header.tensors.get("quant_conv.weight")
        cfg = shipped_config("vae-wan2.2" if z and z.shape[0] == 96 else "vae-wan2.1")
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    with init_empty_weights():
        model = AutoencoderKLWan(**cfg)
    keys = [n for n, _ in model.named_parameters()]
    if "decoder.mid_block.resnets.0.norm1.gamma" in header.tensors:  # diffusers names in one file
        names = {k: k for k in keys}
    else:
        names = vae_name_map(keys, cfg)
    _fill(model, WeightSource(p, names), p, torch.float32)
    return model.eval()


def load_image_encoder(path: str):
    """CLIP vision tower for Wan2.1 I2V (fp32): a transformers folder, or a single file in transformers' names
    (ComfyUI's clip_vision_h.safetensors) with the shipped ViT-H/14 config (or the one the file carries)."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    p = Path(path)
    if p.is_dir():
        enc = CLIPVisionModel.from_pretrained(p, dtype=torch.float32).eval()
        proc_dir = p.parent / "image_processor"
        proc = CLIPImageProcessor.from_pretrained(proc_dir) if proc_dir.is_dir() else \
            CLIPImageProcessor(**shipped_config("clip-image-processor"))
        return enc, proc
    from accelerate import init_empty_weights

    from engine.lora.merge import WeightSource
    from engine.models.headers import embedded_config, read_header

    header = read_header(p)
    if not any(n.startswith("vision_model.") for n in header.tensors):
        raise RequestError(f"{p.name}: only CLIP vision files in transformers' names (vision_model.*) are read, "
                           "as ComfyUI's clip_vision_h.safetensors has them; open_clip names (visual.*) are not")
    cfg = embedded_config(header) or shipped_config("clip-vision-h")
    proc_cfg = cfg.pop("image_processor", None) or shipped_config("clip-image-processor")
    with init_empty_weights():
        enc = CLIPVisionModel(CLIPVisionConfig(**{k: v for k, v in cfg.items() if not k.startswith("_")}))
    # the file keeps transformers 4's `vision_model.` names; newer transformers may name parameters without it
    names = {n: n if n.startswith("vision_model.") else f"vision_model.{n}" for n, _ in enc.named_parameters()}
    _fill(enc, WeightSource(p, names), p, torch.float32)
    return enc.eval(), CLIPImageProcessor(**proc_cfg)
