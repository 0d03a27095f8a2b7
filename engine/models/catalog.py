"""The model catalog: one record per Wan model type, with defaults, experts, LoRA caps and memory figures.

Defaults follow the diffusers Wan docs shipped in the installed package (pipeline_wan.py /
pipeline_wan_i2v.py examples) and the Wan-AI model cards. Parameter counts are from the
released checkpoints (bytes of the bf16 safetensors / 2); each figure names its source.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from engine.types import RequestError

HIGH, LOW, SINGLE = "high_noise", "low_noise", "single"
EXPERT_COMPONENT = {HIGH: "transformer", LOW: "transformer_2", SINGLE: "transformer"}

# Transformer width (num_attention_heads * attention_head_dim) of each released Wan family.
FAMILY_BY_WIDTH = {1536: "Wan 1.3B", 3072: "Wan 5B", 5120: "Wan 14B"}
# The demo models keep the real families apart by width too, so wrong-base checks can be tested.
DEMO_WIDTH = {1536: 16, 3072: 24, 5120: 32}
FAMILY_BY_WIDTH.update({w: f"demo {FAMILY_BY_WIDTH[real]}" for real, w in DEMO_WIDTH.items()})


@dataclass(frozen=True)
class MemoryFigures:
    """Per-component parameter counts and latent geometry, for the VRAM estimator."""

    text_encoder_params: int  # UMT5-XXL encoder: 5.68e9 (google/umt5-xxl encoder half; 11.4 GB bf16 file)
    transformer_params: int  # per expert
    vae_params: int
    image_encoder_params: int = 0  # Wan2.1 I2V: open-clip ViT-H/14 vision tower, 0.63e9
    latent_channels: int = 16
    vae_spatial: int = 8  # pixels per latent cell along H and W
    vae_temporal: int = 4
    patch: tuple[int, int, int] = (1, 2, 2)
    width: int = 5120  # transformer hidden size
    layers: int = 40
    ffn: int = 13824


@dataclass(frozen=True)
class ModelSpec:
    type: str
    label: str
    pipeline_class: str  # diffusers class name
    task: str  # "t2v", "i2v" (image required) or "ti2v" (image optional)
    experts: tuple[str, ...]
    boundary_ratio: float | None
    width: int
    height: int
    frames: int
    fps: int
    steps: int
    guidance: float
    guidance_2: float | None
    shift: float
    lora_cap: int
    memory: MemoryFigures
    size_multiple: int = 16
    resolutions: dict[str, tuple[int, int]] = field(default_factory=dict)  # label -> (width, height)
    demo: bool = False

    @property
    def dual_expert(self) -> bool:
        return len(self.experts) == 2

    @property
    def family(self) -> str:
        return FAMILY_BY_WIDTH.get(self.memory.width, f"tiny demo (width {self.memory.width})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_RES_16 = {"480p landscape": (832, 480), "480p portrait": (480, 832), "720p landscape": (1280, 720), "720p portrait": (720, 1280)}
_RES_5B = {"720p landscape": (1280, 704), "720p portrait": (704, 1280), "480p landscape": (832, 480), "480p portrait": (480, 832)}

_UMT5 = 5_680_000_000
_VAE21 = 127_000_000  # Wan2.1_VAE.pth, 508 MB fp32
_VAE22 = 705_000_000  # Wan2.2_VAE.pth, 2.82 GB fp32
_T14B = 14_290_000_000  # diffusion_pytorch_model*.safetensors of Wan2.1-T2V-14B, 28.6 GB bf16
_T1B = 1_420_000_000  # Wan2.1-T2V-1.3B transformer, 2.84 GB bf16
_T5B = 5_000_000_000  # Wan2.2-TI2V-5B transformer, 10.0 GB bf16
_TI2V14 = 16_400_000_000  # Wan2.1-I2V-14B transformer incl. image projection and k_img/v_img, 32.8 GB bf16

_M14 = dict(width=5120, layers=40, ffn=13824)

REAL = [
    ModelSpec("wan2.2-t2v-a14b", "Wan2.2 T2V A14B", "WanPipeline", "t2v", (HIGH, LOW), 0.875,
              1280, 720, 81, 16, 40, 4.0, 3.0, 12.0, 2,
              MemoryFigures(_UMT5, _T14B, _VAE21, **_M14), resolutions=_RES_16),
    ModelSpec("wan2.2-i2v-a14b", "Wan2.2 I2V A14B", "WanImageToVideoPipeline", "i2v", (HIGH, LOW), 0.9,
              832, 480, 81, 16, 40, 3.5, 3.5, 5.0, 2,
              MemoryFigures(_UMT5, _T14B, _VAE21, **_M14), resolutions=_RES_16),
    ModelSpec("wan2.2-ti2v-5b", "Wan2.2 TI2V 5B", "WanPipeline", "ti2v", (SINGLE,), None,
              1280, 704, 121, 24, 50, 5.0, None, 5.0, 3,
              MemoryFigures(_UMT5, _T5B, _VAE22, latent_channels=48, vae_spatial=16, width=3072, layers=30, ffn=14336),
              size_multiple=32, resolutions=_RES_5B),
    ModelSpec("wan2.1-t2v-14b", "Wan2.1 T2V 14B", "WanPipeline", "t2v", (SINGLE,), None,
              1280, 720, 81, 16, 50, 5.0, None, 5.0, 2,
              MemoryFigures(_UMT5, _T14B, _VAE21, **_M14), resolutions=_RES_16),
    ModelSpec("wan2.1-t2v-1.3b", "Wan2.1 T2V 1.3B", "WanPipeline", "t2v", (SINGLE,), None,
              832, 480, 81, 16, 50, 5.0, None, 3.0, 3,
              MemoryFigures(_UMT5, _T1B, _VAE21, width=1536, layers=30, ffn=8960), resolutions=_RES_16),
    ModelSpec("wan2.1-i2v-14b", "Wan2.1 I2V 14B", "WanImageToVideoPipeline", "i2v", (SINGLE,), None,
              832, 480, 81, 16, 40, 5.0, None, 3.0, 2,
              MemoryFigures(_UMT5, _TI2V14, _VAE21, image_encoder_params=632_000_000, **_M14), resolutions=_RES_16),
]


def _demo(spec: ModelSpec) -> ModelSpec:
    """The tiny random-weight variant: same architecture, small sizes so a run takes seconds on a CPU."""
    m = spec.memory
    mult = spec.size_multiple
    tiny = {"tiny": (mult * 4, mult * 4), "small": (mult * 6, mult * 4)}
    return dataclasses.replace(
        spec,
        type="demo-" + spec.type,
        label=f"Demo {spec.label} (random weights)",
        width=mult * 4, height=mult * 4, frames=9, fps=8, steps=4,
        lora_cap=3,
        memory=dataclasses.replace(
            m, text_encoder_params=60_000, transformer_params=60_000, vae_params=60_000,
            image_encoder_params=60_000 if m.image_encoder_params else 0,
            width=DEMO_WIDTH[m.width], layers=2, ffn=32,
        ),
        resolutions=tiny,
        demo=True,
    )


CATALOG: dict[str, ModelSpec] = {s.type: s for s in REAL}
CATALOG.update({d.type: d for d in (_demo(s) for s in REAL)})


def get_spec(model_type: str) -> ModelSpec:
    try:
        return CATALOG[model_type]
    except KeyError:
        raise RequestError(
            f"unknown model type {model_type!r}; known types: {', '.join(sorted(CATALOG))}"
        ) from None


def with_lora_cap(spec: ModelSpec, caps: dict[str, int]) -> ModelSpec:
    """Apply a `--lora-cap TYPE=N` override."""
    return dataclasses.replace(spec, lora_cap=caps[spec.type]) if spec.type in caps else spec


def parse_lora_caps(items: list[str]) -> dict[str, int]:
    """Parse `TYPE=N` strings; errors say which item is wrong and what is expected."""
    caps: dict[str, int] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit() or int(value) < 1:
            raise RequestError(f"--lora-cap {item!r} must look like TYPE=N with N >= 1, e.g. wan2.2-t2v-a14b=3")
        get_spec(name.strip())
        caps[name.strip()] = int(value)
    return caps
