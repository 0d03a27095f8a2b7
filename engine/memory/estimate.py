"""VRAM estimator (pure): model type x dtype x size x frames x experts x stack -> bytes per component and peak.

A run has phases that do not overlap in time: text encoding, (LoRA merge), denoising, VAE decode.
Each phase needs the weights resident on the GPU in that phase (which depends on the offload
mode) plus that phase's working memory; the peak is the largest phase.

Where each constant comes from:
- Parameter counts: engine/models/catalog.py MemoryFigures (released checkpoints, bytes / 2 of bf16 files).
- UMT5-XXL geometry (vocab 256384, d_model 4096, d_ff 10240, 24 layers): google/umt5-xxl config.json.
- Transformer geometry (width, layers, ffn): the Wan config.json files, copied into MemoryFigures.
- Tokens per forward = latent frames x (H / (vae_spatial * 2)) x (W / (vae_spatial * 2)): Wan patchifies
  latents by (1, 2, 2); the 2.1 VAE compresses 8x spatially and 4x in time, the 2.2 VAE (TI2V-5B) 16x.
- Bytes per token: counted from diffusers' WanTransformerBlock (diffusers 0.42, transformer_wan.py):
  attention keeps hidden (2W), fp32 norm temporaries (8W), q/k/v (6W), rotary outputs (4W) and the
  attention output (2W) alive at once: 22W bytes. The FFN keeps hidden (2W), fp32 norm temporaries
  (8W) and the up-projection and its GELU (2F + 2F): 10W + 4F bytes. CFG runs as two batch-1
  forwards in diffusers' Wan pipelines, so one forward's activations count.
- ALLOCATOR_SLACK 1.15: PyTorch's caching allocator rounds and fragments; an engineering margin.
- CUDA_CONTEXT_BYTES 512 MiB: the CUDA context and cuBLAS workspace, visible to NVML but not to
  torch; typical for CUDA 12 on recent cards (300-600 MiB). An engineering figure.
- VAE decode: diffusers decodes one latent frame at a time with a causal cache, so the working set
  scales with H x W, not with frames. VAE21_DECODE_BYTES_PER_PIXEL is calibrated so that Wan2.1
  T2V-1.3B at 832x480x81 with model offload and the text encoder on the CPU lands on the 8.19 GB the
  Wan2.1 README publishes for that setting (`--offload_model True --t5_cpu`); the first-principles
  count of the decoder's full-resolution stage (96 channels fp32, 4 output + 2 cached frames per
  causal conv) gives about 12 KB, the rest is allocator slack. VAE22 scales that by the top stage's
  channels per output pixel (256 channels at half resolution = 64 per pixel, vs 96): x2/3.
- VAE tiling: diffusers' AutoencoderKLWan tiles at 256x256 pixels (tile_sample_min_height/width);
  the decoded tiles plus the blended result and the final concatenation keep about 4 copies of the
  fp32 output video; untiled decoding keeps 2 (the growing torch.cat).
- fp8 text encoder (engine/models/load.py): its Linear weights stay fp8 (1 byte per parameter), the token
  embedding (vocab x d_model) is read in the compute dtype, and one Linear weight at a time is upcast for its
  call (the largest, an FFN weight, d_ff x d_model, in the text-encode phase).
- LoRA merge transient (DESIGN.md: W = W0 + sum w_i s_i B_i A_i in fp32 from W0): the largest touched
  layer (the FFN up-projection, F x W) as fp32 W0 copy, fp32 accumulator and fp32 B@A product, plus
  the result in the weight dtype: 14 bytes per parameter of that layer. Merged LoRAs add nothing per step.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.models.catalog import ModelSpec
from engine.dtypes import WEIGHT_BYTES
from engine.types import OFFLOAD_MODES
from engine.memory.units import MIB

DTYPE_BYTES = WEIGHT_BYTES  # engine/dtypes.py
# Transformer storages that stay as stored in memory (engine/models: fp8 upcast per layer, GGUF dequantized per
# layer), in bytes per parameter: GGML block bytes / values per block (ggml-common.h block_q* structs).
# bf16/fp16/fp32 files are cast to the compute dtype at load, so they cost DTYPE_BYTES of that dtype.
STORAGE_BYTES_PER_PARAM = {
    "fp8_e4m3fn": 1.0, "fp8_scaled": 1.0,
    "gguf-Q8_0": 34 / 32, "gguf-Q6_K": 210 / 256, "gguf-Q5_K": 176 / 256, "gguf-Q5_1": 24 / 32, "gguf-Q5_0": 22 / 32,
    "gguf-Q4_K": 144 / 256, "gguf-Q4_1": 20 / 32, "gguf-Q4_0": 18 / 32, "gguf-Q3_K": 110 / 256, "gguf-Q2_K": 84 / 256,
    "gguf-BF16": 2.0, "gguf-F16": 2.0, "gguf-F32": 4.0,
}
# Text encoder storages whose Linear weights stay as stored (engine/models/load.py: fp8 upcast per call); its
# token embedding, norms and position tables are read in the compute dtype. Other files are cast at load.
TEXT_ENCODER_BYTES_PER_LINEAR_PARAM = {"fp8_e4m3fn": 1.0, "fp8_scaled": 1.0}
CUDA_CONTEXT_BYTES = 512 * MIB
ALLOCATOR_SLACK = 1.15
TEXT_ENCODE_WORK_BYTES = 256 * MIB  # UMT5 over <= 512 tokens: a few MB per layer, rounded up generously
UMT5_VOCAB, UMT5_D_MODEL, UMT5_D_FF, UMT5_LAYERS = 256_384, 4096, 10_240, 24
UMT5_EMBED_PARAMS = UMT5_VOCAB * UMT5_D_MODEL
# q, k, v, o (d_model x d_model: 64 heads x d_kv 64) and the gated FFN's wi_0, wi_1, wo per layer
UMT5_LINEAR_PARAMS = UMT5_LAYERS * (4 * UMT5_D_MODEL * UMT5_D_MODEL + 3 * UMT5_D_MODEL * UMT5_D_FF)
VAE21_DECODE_BYTES_PER_PIXEL = 16_000
VAE22_DECODE_BYTES_PER_PIXEL = 11_000
VAE_TILE_PIXELS = 256 * 256
UNTILED_OUTPUT_COPIES, TILED_OUTPUT_COPIES = 2, 4
LORA_MERGE_BYTES_PER_PARAM = 14
PROCESS_BASE_RAM_BYTES = 2048 * MIB  # Python, torch, diffusers and the tokenizer, before any weights

MODES = OFFLOAD_MODES


@dataclass(frozen=True)
class Workload:
    """What one run asks of memory. `estimate(mode, ...)` prices it under an offload mode."""

    spec: ModelSpec
    height: int
    width: int
    frames: int
    loras: int = 0  # enabled LoRAs acting on the model (merged: a transient, not a per-step cost)
    dtype: str = "bf16"  # transformer and text encoder
    vae_dtype: str = "fp32"  # the Wan docs (and the generator) load the VAE in fp32
    experts: int | None = None  # defaults to the spec's expert count
    storage: str | None = None  # transformer storage (fp8_scaled, gguf-Q4_K, ...); None: the compute dtype
    text_encoder_storage: str | None = None  # the text encoder file's (fp8_scaled, bf16, ...); None: compute dtype

    def __post_init__(self):
        if self.dtype not in DTYPE_BYTES or self.vae_dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {self.dtype!r}/{self.vae_dtype!r}")
        for name in ("height", "width", "frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    # ---- geometry -------------------------------------------------------------------------
    @property
    def latent_frames(self) -> int:
        return (self.frames - 1) // self.spec.memory.vae_temporal + 1

    @property
    def tokens(self) -> int:
        m = self.spec.memory
        _, ph, pw = m.patch
        cell_h, cell_w = m.vae_spatial * ph, m.vae_spatial * pw
        return self.latent_frames * -(-self.height // cell_h) * -(-self.width // cell_w)

    @property
    def n_experts(self) -> int:
        return self.experts if self.experts is not None else len(self.spec.experts)

    # ---- pieces ---------------------------------------------------------------------------
    def weights(self, dtype: str | None = None) -> dict[str, int]:
        m = self.spec.memory
        b = DTYPE_BYTES[dtype or self.dtype]
        vb = DTYPE_BYTES["fp32" if dtype == "fp32" else self.vae_dtype]
        out = {"text_encoder": self.text_encoder_bytes(dtype)}
        if m.image_encoder_params:
            out["image_encoder"] = m.image_encoder_params * b
        out["transformer"] = int(m.transformer_params * self.transformer_bytes_per_param(dtype))
        if self.n_experts > 1:
            out["transformer_2"] = out["transformer"]
        out["vae"] = m.vae_params * vb
        return out

    def transformer_bytes_per_param(self, dtype: str | None = None) -> float:
        """Bytes per transformer parameter in memory: the storage's when it stays quantized, else the dtype's."""
        kept = STORAGE_BYTES_PER_PARAM.get(self.storage or "")
        return kept if kept is not None else float(DTYPE_BYTES[dtype or self.dtype])

    def text_encoder_bytes(self, dtype: str | None = None) -> int:
        """The text encoder in memory: an fp8 file keeps its Linear weights at 1 byte per parameter (the few
        norm and position-table parameters are counted with them: 0.005% of UMT5-XXL), the embedding and any
        other file take the compute dtype."""
        b = DTYPE_BYTES[dtype or self.dtype]
        if self._te_kept_bytes() is None:
            return self.spec.memory.text_encoder_params * b
        return self._te_shared_params() * b + int(self._te_linear_params() * self._te_bytes_per_linear_param(dtype))

    def text_encode_work_bytes(self, dtype: str | None = None) -> int:
        """Working memory of the text encoding; fp8 Linear weights add one upcast copy of the largest (an FFN)."""
        if self._te_kept_bytes() is None:
            return TEXT_ENCODE_WORK_BYTES
        largest = min(UMT5_D_FF * UMT5_D_MODEL, self._te_linear_params())
        return TEXT_ENCODE_WORK_BYTES + largest * DTYPE_BYTES[dtype or self.dtype]

    def upcast_bytes(self, dtype: str | None = None) -> int:
        """fp8/GGUF layers are turned into the compute dtype one at a time: the largest layer's copy."""
        if (self.storage or "") not in STORAGE_BYTES_PER_PARAM:
            return 0
        return self.largest_layer_params() * DTYPE_BYTES[dtype or self.dtype]

    def activation_bytes(self, dtype: str | None = None) -> int:
        m = self.spec.memory
        scale = DTYPE_BYTES[dtype or self.dtype] / 2  # the per-token counts above are for 16-bit activations
        per_token = max(22 * m.width, 10 * m.width + 4 * m.ffn) * scale
        latents = m.latent_channels * self.latent_frames * self.height * self.width // (m.vae_spatial**2) * 4 * 4
        return int(self.tokens * per_token * ALLOCATOR_SLACK) + latents + self.upcast_bytes(dtype)

    def decode_bytes(self, tiling: bool) -> int:
        m = self.spec.memory
        per_pixel = VAE22_DECODE_BYTES_PER_PIXEL if m.vae_spatial == 16 else VAE21_DECODE_BYTES_PER_PIXEL
        per_pixel = per_pixel * DTYPE_BYTES[self.vae_dtype] // 4
        output = 3 * self.frames * self.height * self.width * 4
        if tiling and (self.height > 256 or self.width > 256):
            return per_pixel * VAE_TILE_PIXELS + TILED_OUTPUT_COPIES * output
        return per_pixel * self.height * self.width + UNTILED_OUTPUT_COPIES * output

    def largest_layer_params(self) -> int:
        m = self.spec.memory
        return m.ffn * m.width

    def lora_merge_bytes(self) -> int:
        return LORA_MERGE_BYTES_PER_PARAM * self.largest_layer_params() if self.loras else 0

    def _transformer_nonblock_params(self) -> int:
        w = self.spec.memory.width
        # time projection (6W^2), text and time embedders (4096W + W^2, 256W + W^2), head: see transformer_wan.py
        return 8 * w * w + 4352 * w

    def _block_params(self) -> int:
        m = self.spec.memory
        return max(0, m.transformer_params - self._transformer_nonblock_params()) // max(1, m.layers)

    def _te_shared_params(self) -> int:
        p = self.spec.memory.text_encoder_params
        if p >= UMT5_EMBED_PARAMS:
            return UMT5_EMBED_PARAMS
        # demo encoders are far smaller than UMT5-XXL: give them its proportions
        return p * UMT5_EMBED_PARAMS // (UMT5_EMBED_PARAMS + UMT5_LINEAR_PARAMS)

    def _te_linear_params(self) -> int:
        return self.spec.memory.text_encoder_params - self._te_shared_params()

    def _te_kept_bytes(self) -> float | None:
        """Bytes per Linear parameter of a text encoder that stays as stored (fp8), None when cast at load."""
        return TEXT_ENCODER_BYTES_PER_LINEAR_PARAM.get(self.text_encoder_storage or "")

    def _te_bytes_per_linear_param(self, dtype: str | None = None) -> float:
        kept = self._te_kept_bytes()
        return kept if kept is not None else float(DTYPE_BYTES[dtype or self.dtype])

    # ---- the estimate ---------------------------------------------------------------------
    def estimate(self, mode: str = "none", vae_tiling: bool = False, text_encoder_on_cpu: bool = False,
                 device: str = "cuda", use_stream: bool = True) -> "Estimate":
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if device == "cpu":
            return self._estimate_cpu(vae_tiling)
        b = DTYPE_BYTES[self.dtype]
        w = self.weights()
        act = self.activation_bytes()
        dec = self.decode_bytes(vae_tiling)
        merge = self.lora_merge_bytes()
        ctx = CUDA_CONTEXT_BYTES
        te = 0 if text_encoder_on_cpu else w["text_encoder"]
        te_work = self.text_encode_work_bytes() if te else 0
        ie = w.get("image_encoder", 0)
        expert = w["transformer"]
        vae = w["vae"]
        i2v = self.spec.task == "i2v"
        prefetch = 2 if use_stream else 1  # with CUDA streams the next group is loaded during the current one

        if mode == "none":
            resident = te + ie + expert * self.n_experts + vae
            phases = {"text_encode": resident + te_work, "denoise": resident + act,
                      "vae_decode": resident + dec}
            if merge:
                phases["lora_merge"] = resident + merge
        elif mode == "model":
            # accelerate's hook chain keeps one model on the GPU; the VAE, last in the chain, stays
            # resident after an I2V run encodes the start image (nothing offloads it until the end).
            phases = {"text_encode": te + te_work,
                      "denoise": expert + act + (vae if i2v else 0), "vae_decode": vae + dec}
            if ie:
                phases["image_encode"] = ie + TEXT_ENCODE_WORK_BYTES
        else:
            if mode == "group":
                t_res = self._transformer_nonblock_params() * b + int(prefetch * self._block_params()
                                                                       * self.transformer_bytes_per_param())
                te_block = self._te_linear_params() // UMT5_LAYERS
                te_res = self._te_shared_params() * b + int(prefetch * te_block * self._te_bytes_per_linear_param())
                vae_res = vae
            else:  # sequential: leaf level, one layer (and a prefetched one) at a time
                t_res = int(prefetch * self.largest_layer_params() * self.transformer_bytes_per_param())
                # the shared embedding is the largest leaf; the prefetched next leaf is a gated-FFN linear
                te_res = self._te_shared_params() * b + int((prefetch - 1) * UMT5_D_FF * UMT5_D_MODEL
                                                             * self._te_bytes_per_linear_param())
                vae_res = vae // 4
            te_res = min(te_res, te)
            phases = {"text_encode": te_res + te_work, "denoise": t_res + act,
                      "vae_decode": vae_res + dec}
            if ie:
                phases["image_encode"] = ie + TEXT_ENCODE_WORK_BYTES
        phases = {k: v + ctx for k, v in phases.items()}
        working = {"activations": act, "vae_decode": dec, "lora_merge": merge, "cuda_context": ctx}
        ram = PROCESS_BASE_RAM_BYTES + sum(w.values()) + (merge if mode != "none" else 0)
        return Estimate(mode=mode, vae_tiling=vae_tiling, text_encoder_on_cpu=text_encoder_on_cpu, device=device,
                        tokens=self.tokens, weights=w, working=working, phases=phases, ram_bytes=ram)

    def _estimate_cpu(self, vae_tiling: bool) -> "Estimate":
        # On the CPU everything lives in RAM in fp32 (engine.device.pick_device); offload is moot.
        w = self.weights("fp32")
        act = self.activation_bytes("fp32")
        dec = self.decode_bytes(vae_tiling) * (4 // DTYPE_BYTES[self.vae_dtype])
        merge = LORA_MERGE_BYTES_PER_PARAM * self.largest_layer_params() if self.loras else 0
        resident = PROCESS_BASE_RAM_BYTES + sum(w.values())
        phases = {"text_encode": resident + self.text_encode_work_bytes("fp32"), "denoise": resident + act,
                  "vae_decode": resident + dec}
        if merge:
            phases["lora_merge"] = resident + merge
        working = {"activations": act, "vae_decode": dec, "lora_merge": merge, "cuda_context": 0}
        return Estimate(mode="none", vae_tiling=vae_tiling, text_encoder_on_cpu=True, device="cpu",
                        tokens=self.tokens, weights=w, working=working, phases=phases,
                        ram_bytes=max(phases.values()))


@dataclass(frozen=True)
class Estimate:
    mode: str
    vae_tiling: bool
    text_encoder_on_cpu: bool
    device: str
    tokens: int
    weights: dict[str, int] = field(default_factory=dict)
    working: dict[str, int] = field(default_factory=dict)
    phases: dict[str, int] = field(default_factory=dict)  # bytes on the device in each phase
    ram_bytes: int = 0

    @property
    def peak_bytes(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.get)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = dict(self.weights)
        d.update(self.working)
        d["peak"] = self.peak_bytes
        d["peak_phase"] = self.peak_phase
        d["phases"] = dict(self.phases)
        d["ram"] = self.ram_bytes
        d["tokens"] = self.tokens
        return d


def estimate(spec: ModelSpec, height: int, width: int, frames: int, *, loras: int = 0, dtype: str = "bf16",
             vae_dtype: str = "fp32", experts: int | None = None, mode: str = "none", vae_tiling: bool = False,
             text_encoder_on_cpu: bool = False, device: str = "cuda", use_stream: bool = True,
             storage: str | None = None, text_encoder_storage: str | None = None) -> Estimate:
    """Peak bytes for one run under one offload mode (pure: no I/O, no torch)."""
    work = Workload(spec, height, width, frames, loras=loras, dtype=dtype, vae_dtype=vae_dtype, experts=experts,
                    storage=storage, text_encoder_storage=text_encoder_storage)
    return work.estimate(mode, vae_tiling, text_encoder_on_cpu, device, use_stream)
