"""The tokenizer embedded in a ComfyUI umt5 file (`spiece_model`) is read without sentencepiece or a hub."""
from __future__ import annotations

import struct


def _varint(n: int) -> bytes:
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out


def _field(num: int, wire: int, payload: bytes) -> bytes:
    key = _varint(num << 3 | wire)
    return key + (_varint(len(payload)) + payload if wire == 2 else payload)


def _model(pieces) -> bytes:
    """A sentencepiece ModelProto: repeated SentencePiece {piece=1, score=2, type=3} as field 1."""
    out = b""
    for piece, score, kind in pieces:
        sp = _field(1, 2, piece.encode()) + _field(2, 5, struct.pack("<f", score)) + _field(3, 0, _varint(kind))
        out += _field(1, 2, sp)
    return out + _field(3, 2, _field(1, 2, b"identity"))


PIECES = [("<pad>", 0.0, 3), ("</s>", 0.0, 3), ("<unk>", 0.0, 2), ("▁a", -1.0, 1), ("▁cat", -1.5, 1),
          ("▁c", -4.0, 1), ("at", -4.0, 1), ("▁", -3.0, 1), ("s", -5.0, 1)]


def test_embedded_spiece_model_tokenizes(tmp_path):
    import torch
    from safetensors.torch import save_file

    from engine.models.load import load_tokenizer
    from engine.models.recipes import find_tokenizer

    path = tmp_path / "umt5_xxl_fp16.safetensors"
    data = torch.frombuffer(bytearray(_model(PIECES)), dtype=torch.uint8)
    save_file({"shared.weight": torch.zeros(9, 4), "spiece_model": data}, str(path))
    found = find_tokenizer(str(path), [], demo=False)
    assert found == f"{path}#spiece_model"
    tok = load_tokenizer(found)
    assert tok("a cat").input_ids == [3, 4, 1]  # ▁a ▁cat </s>
    assert tok("a  cats").input_ids == [3, 4, 8, 1]  # spaces folded, unknown tail split into known pieces
    assert tok.decode([3, 4]) == "a cat"


def test_unreadable_spiece_model_says_what_to_do(tmp_path):
    import pytest

    from engine.models.spiece import tokenizer_from_bytes
    from engine.types import RequestError

    with pytest.raises(RequestError, match="tokenizer/"):
        tokenizer_from_bytes(b"\x0a\xff\xff\xff", "x: spiece_model")
