"""Test defaults: CPU only, offline, few threads, so the suite behaves the same on CI and laptops."""

import os

os.environ.setdefault("CMAPKD_DEVICE", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("CMAPKD_WARM", "0")  # no background warm-start servers; tests/test_warm.py turns it on

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def project_root() -> Path:
    return ROOT


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def params():
    """The project's model and loss params (embedded default)."""
    from cmapkd.config import load_params

    return load_params(["model", "loss"], path=ROOT / "params.yaml")


@pytest.fixture(scope="module")
def teacher(params):
    """The embedded teacher with seeded random heads, in eval mode."""
    import torch

    from cmapkd.models.encoders import build_encoder

    torch.manual_seed(0)
    return build_encoder(params.model.teacher).eval()


@pytest.fixture(scope="module")
def student(params):
    """The embedded student with seeded random weights, in eval mode."""
    import torch

    from cmapkd.models.encoders import build_encoder

    torch.manual_seed(0)
    return build_encoder(params.model.student).eval()
