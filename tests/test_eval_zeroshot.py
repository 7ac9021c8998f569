"""Zero-shot weights (cross-checked with open_clip) and scores on a hand-built case."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cmapkd.eval.zeroshot import build_zeroshot_weights, zeroshot_classify


def test_weights_mean_of_normalised_templates():
    table = {"a cat": [2.0, 0, 0], "the cat": [0, 5.0, 0], "a dog": [0, 0, 1.0], "the dog": [0, 0, 3.0]}
    enc = lambda texts: torch.tensor([table[t] for t in texts])  # noqa: E731
    w = build_zeroshot_weights(enc, ["cat", "dog"], ["a {}", lambda c: f"the {c}"], classes_per_batch=1)
    s = 2**-0.5
    assert torch.allclose(w, torch.tensor([[s, 0.0], [s, 0.0], [0.0, 1.0]]))


def test_weights_equal_open_clip():
    open_clip_zs = pytest.importorskip("open_clip.zero_shot_classifier")
    classnames, templates = ["cat", "dog", "car"], ["a photo of a {}.", "a {}", "art of the {}"]
    texts = [t.format(c) for c in classnames for t in templates]
    table = torch.randn(len(texts), 6, generator=torch.Generator().manual_seed(0))

    class Model:  # open_clip's interface: encode_text(token ids, normalize=...)
        def encode_text(self, ids, normalize=False):
            x = table[ids]
            return F.normalize(x, dim=-1) if normalize else x

    tokenizer = lambda ts: torch.tensor([texts.index(t) for t in ts])  # noqa: E731
    ref = open_clip_zs.build_zero_shot_classifier(Model(), tokenizer, classnames, templates, num_classes_per_batch=2)
    ours = build_zeroshot_weights(lambda ts: table[tokenizer(ts)], classnames, templates)
    assert torch.allclose(ours, ref, atol=1e-6)


def test_hand_built_scores():
    w = torch.eye(7)  # class c has weight e_c
    e = torch.eye(7)
    img = torch.stack([e[0], e[0] + 0.5 * e[1], e[6], e[6], e[6], e[6]])
    labels = [0, 1, 2, 3, 5, 6]
    r = zeroshot_classify(img, w, labels)
    # top-1 predictions: 0, 0, 6, 6, 6, 6 -> correct for images 0 and 5: 2/6.
    # ranks of the true class: 0, 1, and for the e6 images (score 1 for class 6, 0 for all
    # others, ties by class index): class 2 -> 3, class 3 -> 4, class 5 -> 6 (misses top-5), class 6 -> 0.
    assert r.top1 == pytest.approx(2 / 6)
    assert r.top5 == pytest.approx(5 / 6)
    # per-class recall: classes 0 and 6 -> 1, classes 1, 2, 3, 5 -> 0, class 4 has no image (NaN)
    np.testing.assert_array_equal(r.per_class_recall, [1, 0, 0, 0, np.nan, 0, 1])
    assert r.mean_per_class_recall == pytest.approx(2 / 6)
    assert r.confusion.sum() == 6 and r.confusion[1, 0] == 1 and r.confusion[5, 6] == 1 and r.confusion[6, 6] == 1
    np.testing.assert_array_equal(r.predictions, [0, 0, 6, 6, 6, 6])
    assert set(r.metrics()) == {"zeroshot_top1", "zeroshot_top5", "zeroshot_mean_per_class_recall"}


def test_topk_clipped_to_number_of_classes():
    r = zeroshot_classify(torch.eye(3), -torch.eye(3), [0, 1, 2])  # every true class ranks last
    assert r.top1 == 0.0 and r.top5 == 1.0
    with pytest.raises(ValueError, match=r"labels\[1\] = 3"):
        zeroshot_classify(torch.eye(3), torch.eye(3), [0, 3, 1])
