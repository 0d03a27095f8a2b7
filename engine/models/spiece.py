"""The umt5 tokenizer from a sentencepiece model embedded in a ComfyUI text-encoder file (`spiece_model`, uint8).

sentencepiece itself is not needed: the model is a small protobuf (pieces with scores and types, the
normalizer's precompiled charmap), read here with a few lines of wire-format parsing and turned into a
`tokenizers` Unigram tokenizer the way transformers' T5 converter builds one (Precompiled normalizer,
Metaspace pre-tokenizer, `</s>` appended).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

from engine.types import RequestError

_UNKNOWN, _CONTROL = 2, 3


def _fields(buf: bytes):
    """(field number, wire type, value) of one protobuf message; value is int, bytes or a 4/8-byte blob."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield num, wire, value


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        b = buf[i]
        i += 1
        out |= (b & 0x7F) << shift
        if not b & 0x80:
            return out, i
        shift += 7


@dataclass
class SpModel:
    pieces: list[tuple[str, float, int]] = field(default_factory=list)  # (piece, score, type)
    charsmap: bytes = b""
    unk_id: int = 0


def parse_model(data: bytes) -> SpModel:
    model = SpModel()
    for num, _wire, value in _fields(data):
        if num == 1:  # SentencePiece
            piece, score, kind = "", 0.0, 1
            for n, _w, v in _fields(value):
                if n == 1:
                    piece = v.decode("utf-8")
                elif n == 2:
                    score = struct.unpack("<f", v)[0]
                elif n == 3:
                    kind = v
            if kind == _UNKNOWN:
                model.unk_id = len(model.pieces)
            model.pieces.append((piece, score, kind))
        elif num == 3:  # NormalizerSpec
            for n, _w, v in _fields(value):
                if n == 2:
                    model.charsmap = bytes(v)
    if not model.pieces:
        raise ValueError("no pieces")
    return model


def tokenizer_from_bytes(data: bytes, name: str = "spiece_model"):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    try:
        sp = parse_model(data)
    except (ValueError, IndexError, UnicodeDecodeError, struct.error) as e:
        raise RequestError(f"{name} is not a readable sentencepiece model ({e}); put the umt5-xxl tokenizer "
                           "folder next to the text encoder as tokenizer/") from None
    tok = Tokenizer(models.Unigram([(p, s) for p, s, _ in sp.pieces], unk_id=sp.unk_id, byte_fallback=False))
    norms = [normalizers.Precompiled(sp.charsmap)] if sp.charsmap else []
    tok.normalizer = normalizers.Sequence(norms + [normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    pieces = {p for p, _, _ in sp.pieces}
    eos = "</s>" if "</s>" in pieces else None
    if eos:
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, unk_token=sp.pieces[sp.unk_id][0],
                                   pad_token="<pad>" if "<pad>" in pieces else None, model_max_length=512)


def tokenizer_from_embedded(path: Path):
    """The tokenizer of a text-encoder file that carries `spiece_model`."""
    from engine.lora.merge import WeightSource

    src = WeightSource(path, {"spiece_model": "spiece_model"})
    if "spiece_model" not in src.index:
        raise RequestError(f"{path.name} carries no spiece_model; put the umt5-xxl tokenizer next to it as tokenizer/")
    import torch

    data = src.read("spiece_model", torch.uint8)
    return tokenizer_from_bytes(bytes(data.numpy().tobytes()), f"{path.name}: spiece_model")
