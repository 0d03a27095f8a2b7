"""Shared fixtures: tiny demo models built once per session, and the `gpu` marker's skip."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("demo-models")


@pytest.fixture(scope="session")
def demo_loras_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("demo-loras")


@pytest.fixture(scope="session")
def demo_model(demo_root, demo_loras_dir):
    """demo_model(arch) -> Path of a demo model folder for that architecture, built once per session.

    The demo LoRAs for that architecture are written into `demo_loras_dir`.
    """
    from engine.models.demo import build_demo_model

    built: dict[str, Path] = {}

    def get(arch: str = "wan2.1-t2v-1.3b") -> Path:
        arch = arch.removeprefix("demo-")
        if arch not in built:
            built[arch] = build_demo_model(demo_root / f"demo-{arch}", arch, loras_dir=demo_loras_dir)
        return built[arch]

    return get


@pytest.fixture
def start_image(tmp_path) -> Path:
    from PIL import Image

    path = tmp_path / "start.png"
    Image.new("RGB", (96, 80), (200, 40, 40)).save(path)
    return path


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")
