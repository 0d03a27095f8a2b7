"""Offload policy with snapshots built directly: the situation table, reasons, fixed choices, CPU-only, CLI."""
from __future__ import annotations

import json
import re

import pytest

from engine.models.catalog import get_spec
from engine.memory import MemorySnapshot, OffloadMode, OffloadPlan, Workload, choose_offload, plan_for
from engine.types import RequestError

GIB = 1 << 30
RESERVE = 1 * GIB

# (model type, height, width) x free GiB -> (mode, vae_tiling, fits); 81 frames, no LoRAs, 1 GiB reserve.
# Why: A14B's one expert is 26.6 GiB of bf16 weights, so model offload never fits a consumer card and
# group offload is the lightest that does; at 720p its activations alone are ~9 GiB. The 5B fits model
# offload (10 GB expert) on 16-24 GiB. The 1.3B fits whole on 24 GiB at 480p; its text encoder (10.6
# GiB) is what pushes 16 GiB cards to model offload. VAE tiling comes on once untiled decoding
# (~6 GiB at 480p, ~15 GiB at 720p) is what no longer fits.
TABLE = {
    ("wan2.2-t2v-a14b", 480, 832): {24: ("group", False, True), 16: ("group", False, True),
                                     12: ("group", False, True), 8: ("group", True, True)},
    ("wan2.2-t2v-a14b", 720, 1280): {24: ("group", False, True), 16: ("group", True, True),
                                      12: ("sequential", True, True), 8: ("sequential", True, False)},
    ("wan2.2-ti2v-5b", 480, 832): {24: ("model", False, True), 16: ("model", False, True),
                                    12: ("group", False, True), 8: ("group", True, True)},
    ("wan2.2-ti2v-5b", 704, 1280): {24: ("model", False, True), 16: ("model", False, True),
                                     12: ("group", True, True), 8: ("sequential", True, True)},
    ("wan2.1-t2v-1.3b", 480, 832): {24: ("none", False, True), 16: ("model", False, True),
                                     12: ("group", False, True), 8: ("group", True, True)},
    ("wan2.1-t2v-1.3b", 720, 1280): {24: ("none", True, True), 16: ("model", True, True),
                                      12: ("group", True, True), 8: ("group", True, True)},
}
CASES = [(key, free, expected) for key, row in TABLE.items() for free, expected in row.items()]


def snap(free_gib, ram_gib=128):
    return MemorySnapshot.planned(int(free_gib * GIB), int(ram_gib * GIB))


@pytest.mark.parametrize("key, free_gib, expected", CASES, ids=[f"{k[0]}-{k[1]}p-{f}GiB" for k, f, _ in CASES])
def test_situation_table(key, free_gib, expected):
    model_type, h, w = key
    plan = choose_offload(snap(free_gib), Workload(get_spec(model_type), h, w, 81), "auto", RESERVE)
    assert (plan.mode.value, plan.vae_tiling, plan.fits) == expected, plan.reasons
    if plan.fits:
        assert plan.peak_bytes <= free_gib * GIB - RESERVE
    assert not plan.text_encoder_on_cpu  # group offload streams the encoder's blocks instead


def test_more_free_memory_never_picks_a_heavier_mode():
    order = list(OffloadMode)
    for model_type, h, w in TABLE:
        work = Workload(get_spec(model_type), h, w, 81)
        ranks = [order.index(choose_offload(snap(free), work).mode) for free in (8, 10, 12, 16, 20, 24, 32, 48, 80)]
        assert ranks == sorted(ranks, reverse=True), (model_type, h, ranks)


def test_reserve_is_kept_free():
    work = Workload(get_spec("wan2.1-t2v-1.3b"), 480, 832, 81)
    roomy = choose_offload(snap(24), work, reserve_bytes=0)
    tight = choose_offload(snap(24), work, reserve_bytes=6 * GIB)
    tighter = choose_offload(snap(24), work, reserve_bytes=12 * GIB)
    assert (roomy.mode, roomy.vae_tiling) == (OffloadMode.NONE, False)
    assert (tight.mode, tight.vae_tiling) == (OffloadMode.NONE, True)  # untiled decode no longer fits
    assert tighter.mode is not OffloadMode.NONE
    assert tight.usable_vram_bytes == 18 * GIB and tight.peak_bytes <= 18 * GIB
    assert tighter.peak_bytes <= 12 * GIB


def test_reasons_read_like_the_issue_example():
    plan = choose_offload(snap(16), Workload(get_spec("wan2.2-t2v-a14b"), 720, 1280, 81))
    first = plan.reasons[0]
    assert re.fullmatch(r"needs \d+\.\d GiB, 15\.0 GiB free after the 1\.0 GiB reserve: "
                        r"group offload with VAE tiling \(est\. \d+\.\d GiB\)", first), first
    assert any("VAE tiling is on" in r for r in plan.reasons)
    assert any("Both experts stay in system RAM" in r for r in plan.reasons)


def test_fixed_choice_is_kept_and_warned_about_when_it_does_not_fit():
    work = Workload(get_spec("wan2.2-t2v-a14b"), 480, 832, 81)
    plan = choose_offload(snap(16), work, "model")
    assert plan.mode is OffloadMode.MODEL and not plan.fits
    assert "you chose model offload" in plan.reasons[0] and "auto would choose group offload" in plan.reasons[0]
    fine = choose_offload(snap(16), work, "sequential")
    assert fine.mode is OffloadMode.SEQUENTIAL and fine.fits and fine.choice == "sequential"
    with pytest.raises(RequestError, match="offload 'turbo'"):
        choose_offload(snap(16), work, "turbo")


def test_nothing_fits_says_what_to_lower():
    plan = choose_offload(snap(4), Workload(get_spec("wan2.2-t2v-a14b"), 720, 1280, 121))
    assert not plan.fits and plan.mode is OffloadMode.SEQUENTIAL and plan.vae_tiling
    assert "lower the frames or the resolution" in plan.reasons[0]


def test_cpu_only_machine_plans_for_ram():
    cpu = MemorySnapshot.unavailable("GPU memory cannot be read: no driver (LibraryNotFound)",
                                     ram_total_bytes=32 * GIB, ram_available_bytes=24 * GIB)
    demo = plan_for(get_spec("demo-wan2.1-t2v-1.3b"), 64, 64, 9, snapshot=cpu)
    assert demo.device == "cpu" and demo.mode is OffloadMode.NONE and demo.fits
    assert "running on the CPU" in demo.reasons[0] and "LibraryNotFound" in demo.reasons[0]
    big = plan_for(get_spec("wan2.2-t2v-a14b"), 720, 1280, 81, snapshot=cpu)
    assert not big.fits and any("only 24.0 GiB available" in r for r in big.reasons)


def test_ram_shortage_is_mentioned_for_offload_modes():
    plan = choose_offload(snap(16, ram_gib=32), Workload(get_spec("wan2.2-t2v-a14b"), 480, 832, 81))
    assert any("system RAM" in r and "expect swapping" in r for r in plan.reasons)


def test_plan_round_trips_to_json_and_escalates_in_order():
    plan = choose_offload(snap(24), Workload(get_spec("wan2.1-t2v-1.3b"), 480, 832, 81))
    d = json.loads(json.dumps(plan.to_dict()))
    assert d["mode"] == "none" and d["fits"] is True and d["estimate_bytes"]["peak"] == plan.peak_bytes
    assert set(d["estimate_bytes"]["phases"]) >= {"text_encode", "denoise", "vae_decode"}
    chain = [(plan.mode.value, plan.vae_tiling)]
    while (plan := plan.escalated()) is not None:
        chain.append((plan.mode.value, plan.vae_tiling))
    assert chain == [("none", False), ("model", True), ("group", True), ("sequential", True)]
    last = OffloadPlan(mode="sequential")
    assert [(p.mode.value, p.vae_tiling) for p in [last.escalated()]] == [("sequential", True)]
    assert last.escalated().escalated() is None


def run_cli(capsys, *argv):
    from engine.__main__ import main

    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_plan_cli_done_when(capsys):
    code, out, _ = run_cli(capsys, "plan", "--model-type", "wan2.2-t2v-a14b", "--height", "720", "--width", "1280",
                           "--frames", "81", "--free-vram", "16GiB", "--ram", "64GiB", "--json")
    assert code == 0
    d = json.loads(out)
    assert (d["mode"], d["vae_tiling"], d["fits"]) == ("group", True, True)
    e = d["estimate_bytes"]
    assert {"text_encoder", "transformer", "transformer_2", "vae", "activations", "vae_decode", "peak"} <= set(e)
    assert e["peak"] <= 15 * GIB
    assert d["reasons"][0].startswith("needs ") and "group offload with VAE tiling (est." in d["reasons"][0]


def test_plan_cli_bad_input_is_one_line(capsys):
    code, _, err = run_cli(capsys, "plan", "--model-type", "wan2.2-ti2v-5b", "--height", "100", "--free-vram", "24GiB")
    assert code == 2 and err.strip() == "error: --height 100 must be a multiple of 32 for wan2.2-ti2v-5b (try 96)"
    code, _, err = run_cli(capsys, "plan", "--model-type", "wan2.1-t2v-1.3b", "--free-vram", "lots")
    assert code == 2 and "--free-vram 'lots' is not a size" in err
    code, out, _ = run_cli(capsys, "plan", "--model-type", "wan2.1-t2v-1.3b", "--free-vram", "24GiB")
    assert code == 0 and out.startswith("wan2.1-t2v-1.3b 832x480x81: no offload")


def test_plan_cli_prices_an_fp8_text_encoder(capsys):
    args = ("plan", "--model-type", "wan2.2-t2v-a14b", "--height", "480", "--width", "832", "--frames", "81",
            "--free-vram", "24GiB", "--ram", "64GiB", "--storage", "fp8_scaled", "--json")
    code, out, _ = run_cli(capsys, *args)
    bf16 = json.loads(out)["estimate_bytes"]
    code, out, _ = run_cli(capsys, *args, "--text-encoder-storage", "fp8_scaled")
    fp8 = json.loads(out)["estimate_bytes"]
    assert code == 0
    # umt5-xxl: 4.63e9 Linear parameters go from 2 bytes to 1; the embedding stays in the compute dtype
    assert 4.0e9 < bf16["text_encoder"] - fp8["text_encoder"] < 5.0e9
    assert 4.0e9 < bf16["ram"] - fp8["ram"] < 5.0e9
    code, _, err = run_cli(capsys, *args, "--text-encoder-storage", "q4")
    assert code == 2 and "--text-encoder-storage 'q4' is not one of" in err
