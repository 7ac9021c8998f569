"""scripts/gpu_check.sh (the paper setting's GPU check): says "no GPU" and exits 0 without one, and its
measuring code runs (on the CPU, tiny batch, random weights) so that it cannot rot unseen."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would measure it")
def test_gpu_check_without_gpu_says_so_and_exits_0():
    r = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "no GPU here" in r.stdout and "nothing measured" in r.stdout


def test_packaged_photos_make_a_real_batch():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_check import photo_batch

    from cmapkd.sample_photos import PHOTOS

    images, captions = photo_batch(10, 64, seed=0)
    assert images.shape == (10, 3, 64, 64) and images.dtype == torch.uint8
    assert captions[:len(PHOTOS)] == [p.captions[0] for p in PHOTOS] and captions[8] == PHOTOS[0].captions[0]
    # real photos, not noise: neighbouring pixels are strongly correlated, and crops differ
    x = images.float()
    corr = torch.corrcoef(torch.stack([x[..., :-1].flatten(), x[..., 1:].flatten()]))[0, 1]
    assert corr > 0.8
    assert not torch.equal(images[0], images[8])  # the same photo, another crop


@pytest.mark.slow
def test_gpu_check_code_path_on_cpu():
    """The whole check on the CPU: random ViT-L-14 -> ViT-B-16, batch 2, one timed step of each
    variant and one cache batch (about a minute on 2 idle cores)."""
    r = subprocess.run(["bash", "scripts/gpu_check.sh", "--device", "cpu", "--random-weights", "--batch-size", "2",
                        "--steps", "1", "--warmup", "0", "--cache-batches", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    out = r.stdout
    assert "RANDOM weights (--random-weights)" in out
    for row in ("| plain (open_clip ClipLoss, student only) |", "| cached (CMAPKD step, cached fp16 targets) |",
                "| online (CMAPKD step + teacher forward) |"):
        line = next(l for l in out.splitlines() if l.startswith(row))
        assert float(line.split("|")[2]) > 0  # samples/s measured
    assert "teacher cache write rate:" in out
