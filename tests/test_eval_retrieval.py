"""recall_at_k against a brute-force loop (with deliberate ties) and a hand-built case."""

import numpy as np
import pytest
import torch

from cmapkd.eval.retrieval import flatten_retrieval, recall_at_k


def brute_force(img, txt, t2i, ks):
    """Reference: per query, a python sort by (descending score, ascending index)."""
    img = img / np.linalg.norm(img, axis=1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    s = txt @ img.T  # [n_txt, n_img]
    n_txt, n_img = s.shape
    out = {"i2t": {}, "t2i": {}}
    for k in ks:
        hits = 0
        for j in range(n_txt):
            order = sorted(range(n_img), key=lambda i: (-s[j, i], i))
            hits += t2i[j] in order[:k]
        out["t2i"][k] = hits / n_txt
        hits = 0
        for i in range(n_img):
            order = sorted(range(n_txt), key=lambda j: (-s[j, i], j))
            hits += any(t2i[j] == i for j in order[:k])
        out["i2t"][k] = hits / n_img
    return out


def test_matches_brute_force_gaussian():
    rng = np.random.default_rng(0)
    n_img, d = 40, 8
    t2i = np.repeat(np.arange(n_img), 5)
    rng.shuffle(t2i)
    img = rng.normal(size=(n_img, d))
    txt = img[t2i] + rng.normal(size=(len(t2i), d)) * 1.5
    got = recall_at_k(img, txt, t2i, ks=(1, 5, 10), chunk_size=16)
    want = brute_force(img, txt, t2i, (1, 5, 10))
    assert got == want


def test_matches_brute_force_with_ties():
    # entries +-1 in 16-d: every norm is exactly 4, every score a multiple of 1/16, all exact in
    # float64, so many scores tie exactly; duplicated rows add more ties.
    rng = np.random.default_rng(1)
    n_img, d = 30, 16
    img = rng.choice([-1.0, 1.0], size=(n_img, d))
    img[10:15] = img[0]  # five identical images
    t2i = np.repeat(np.arange(n_img), 5)
    txt = np.where(rng.random((len(t2i), d)) < 0.3, -img[t2i], img[t2i])  # noisy copies of their image
    txt[50:60] = txt[3]  # ten identical captions belonging to different images
    ks = (1, 2, 5, 10)
    want = brute_force(img, txt, t2i, ks)
    s = txt @ img.T
    assert len(np.unique(s)) < 20  # the test really has ties
    for chunk in (7, 512):
        assert recall_at_k(torch.tensor(img), torch.tensor(txt), t2i, ks=ks, chunk_size=chunk) == want


def test_hand_built_case():
    img = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    txt = np.array([[3.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 2.0]])  # normalised inside
    t2i = [0, 1, 2, 1]
    got = recall_at_k(img, txt, t2i, ks=(1, 2, 3))
    # t2i: c0 ranks i0 first; c1 ranks i0 > i1 (rank 1); c2 scores (0, 1, 0): i1, then the tie
    # i0 before i2 by index, so i2 has rank 2; c3 ranks i1 first.  -> R@1 2/4, R@2 3/4, R@3 1
    assert got["t2i"] == {1: 0.5, 2: 0.75, 3: 1.0}
    # i2t: i0 scores captions (1, 1, 0, 0), its c0 is first; i1 scores (0, 0, 1, 1), its best
    # caption c3 comes after c2 (tie, lower index), rank 1; i2 scores (-1, -1, 0, 0), its c2 ties
    # with c3 and wins by index, rank 0.  -> R@1 2/3, R@2 1, R@3 1
    assert got["i2t"] == {1: pytest.approx(2 / 3), 2: 1.0, 3: 1.0}


def test_flatten_and_errors():
    m = {"i2t": {1: 0.1, 5: 0.2, 10: 0.3}, "t2i": {1: 0.4, 5: 0.5, 10: 0.6}}
    flat = flatten_retrieval(m)
    assert list(flat) == ["retrieval_i2t_r1", "retrieval_i2t_r5", "retrieval_i2t_r10",
                          "retrieval_t2i_r1", "retrieval_t2i_r5", "retrieval_t2i_r10", "retrieval_mean"]
    assert flat["retrieval_mean"] == pytest.approx(0.35)
    img, txt = np.eye(3), np.eye(3)
    with pytest.raises(ValueError, match="image 2 has no caption"):
        recall_at_k(img, txt, [0, 1, 1])
    with pytest.raises(ValueError, match=r"text_to_image\[1\] = 5"):
        recall_at_k(img, txt, [0, 5, 2])
    with pytest.raises(ValueError, match="dim"):
        recall_at_k(img, np.eye(3, 4), [0, 1, 2])
