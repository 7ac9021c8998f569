"""The student starts from pretrained weights (METHOD.md 1) and trains only what params say;
the paired Scratch comparison and the collapse metrics of the evaluation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import yaml

from cmapkd.config import load_params
from cmapkd.distill.baselines import build_baseline
from cmapkd.eval.run import mean_pairwise_cosine, random_student
from cmapkd.models.encoders import build_encoder
from cmapkd.models.towers import load_efficientnet_lite
from cmapkd.report.stats import Ranks, RanksError, mean_recall, paired_delta

from conftest import ROOT


def test_both_settings_start_the_student_from_pretrained_weights(params):
    s = params.model.student
    assert s.kind == "towers" and s.image_weights == "package" and s.text_model == "package"
    overlay = yaml.safe_load((ROOT / "configs" / "paper.yaml").read_text())
    assert overlay["model"]["student"]["pretrained"] == "openai"
    # the embedded student's image tower holds the registry package's ImageNet weights
    ref = load_efficientnet_lite(s.image_model, s.image_weights)
    got = build_encoder(s).image.backbone.state_dict()
    assert torch.equal(got["conv_stem.weight"], ref.state_dict()["conv_stem.weight"])


def test_trainable_blocks_fix_the_lower_backbone(params):
    torch.manual_seed(0)
    student = build_encoder(params.model.student).set_trainable_blocks(1, freeze_bn=True)
    last = student.last_blocks(1)
    trained = {id(p) for m in student.heads() + last for p in m.parameters()} | {id(student.logit_scale)}
    fixed = [p for p in student.parameters() if id(p) not in trained]
    assert fixed and all(not p.requires_grad and getattr(p, "cmapkd_fixed", False) for p in fixed)
    assert all(p.requires_grad for p in student.parameters() if id(p) in trained)
    # the optimiser groups of a method leave fixed weights out, and unfreezing never brings them back
    method = build_baseline("scratch", params, student)
    grouped = {id(p) for g in method.param_groups({"student": 1e-3}) for p in g["params"]}
    assert grouped == trained
    method.freeze_groups(["student"], frozen=True)
    method.freeze_groups(["student"], frozen=False)
    assert all(not p.requires_grad for p in fixed)
    # fixed modules and every BatchNorm stay in eval mode in a training step; gradients reach only the trained
    method.train()
    bns = [m for m in student.image.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert not student.text.encoder.encoder.layer[0].training and student.text.encoder.encoder.layer[-1].training
    x = torch.randint(0, 255, (4, 3, 64, 64), dtype=torch.uint8)
    ids, mask = student.tokenize(["one cat", "two dogs", "a red car", "a small tree"])
    method(x, ids, mask)["total"].backward()
    assert all(p.grad is None for p in fixed)
    assert all(p.grad is not None for m in last for p in m.parameters() if p.ndim > 1)


def test_trainable_blocks_per_tower(params):
    """[image, text]: the image backbone's last block trains, the whole text encoder is fixed."""
    torch.manual_seed(0)
    student = build_encoder(params.model.student).set_trainable_blocks([1, 0])
    assert not any(p.requires_grad for p in student.text.encoder.parameters())
    assert student.image.backbone.conv_head.weight.requires_grad
    assert not student.image.backbone.conv_stem.weight.requires_grad
    assert student.text.proj.weight.requires_grad and student.logit_scale.requires_grad
    everything = build_encoder(params.model.student).set_trainable_blocks([-1, -1])
    assert all(p.requires_grad for p in everything.parameters())


def test_student_init_heads_are_loaded_strictly(params, tmp_path):
    """build_student: the student_init folder's heads replace the random ones; a folder of another
    student is refused, naming the differing identity."""
    from cmapkd.distill.runs import build_student
    from cmapkd.distill.teacher import SPEC_FILE, SPEC_FORMAT, WEIGHTS_FILE, head_state, save_weights, trained_keys

    full = load_params(path=ROOT / "params.yaml")
    torch.manual_seed(1)
    enc = build_encoder(full.model.student)
    keys = trained_keys(enc, 0)
    with torch.no_grad():
        enc.image.proj.weight.fill_(0.25)
    save_weights(head_state(enc, keys), tmp_path / WEIGHTS_FILE)
    spec = {"format": SPEC_FORMAT, "encoder_spec": dataclasses.asdict(full.model.student), "identity": enc.identity(),
            "keys": keys, "role": "student"}
    (tmp_path / SPEC_FILE).write_text(__import__("json").dumps(spec))
    student = build_student(full, tmp_path)
    assert torch.all(student.image.proj.weight == 0.25)
    assert student.image.proj.weight.requires_grad
    spec["identity"] = dict(spec["identity"], weights_sha256="0" * 64)
    (tmp_path / SPEC_FILE).write_text(__import__("json").dumps(spec))
    with pytest.raises(ValueError, match="student init.*weights_sha256"):
        build_student(full, tmp_path)


def test_random_student_differs_from_the_pretrained_one(params):
    full = load_params(path=ROOT / "params.yaml")
    a, b = random_student(full, 0), random_student(full, 0)
    pre = build_encoder(full.model.student)
    wa = a.image.backbone.conv_stem.weight
    assert torch.equal(wa, b.image.backbone.conv_stem.weight)  # seeded
    assert not torch.allclose(wa, pre.image.backbone.conv_stem.weight)
    assert not torch.allclose(a.text.encoder.embeddings.word_embeddings.weight, pre.text.encoder.embeddings.word_embeddings.weight)


def test_mean_pairwise_cosine():
    same = torch.ones(5, 3)
    assert mean_pairwise_cosine(same) == pytest.approx(1.0)
    assert mean_pairwise_cosine(torch.eye(4)) == pytest.approx(0.0)
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    e = torch.nn.functional.normalize(x, dim=1)
    brute = (e @ e.T)[~torch.eye(50, dtype=torch.bool)].mean()
    assert mean_pairwise_cosine(x) == pytest.approx(float(brute), abs=1e-9)


def _ranks(i2t, t2i, t2i_map):
    return Ranks(np.asarray(i2t), np.asarray(t2i), np.asarray(t2i_map))


def test_paired_delta_values():
    t2i_map = np.repeat(np.arange(4), 2)
    a = _ranks([0, 0, 0, 0], [0] * 8, t2i_map)  # every query a hit at 1
    b = _ranks([20, 20, 20, 20], [20] * 8, t2i_map)  # none within 10
    assert mean_recall([a]) == 1.0 and mean_recall([b]) == 0.0
    d = paired_delta([a], [b])
    assert d.diff == pytest.approx(1.0) and d.lo == pytest.approx(1.0) and d.hi == pytest.approx(1.0)
    same = paired_delta([a, b], [a, b])
    assert same.diff == 0 and same.lo == 0 and same.hi == 0 and not same.significant
    # a hit at rank 3 counts for R@5 and R@10 only; seeds are averaged query by query
    c = _ranks([3, 20, 20, 20], [20] * 8, t2i_map)
    assert mean_recall([c]) == pytest.approx((2 / 4) / 6)
    assert mean_recall([a, c]) == pytest.approx((1.0 + (2 / 4) / 6) / 2)
    d2 = paired_delta([c], [b])
    assert d2.diff == pytest.approx((2 / 4) / 6) and d2.lo <= d2.diff <= d2.hi
    assert paired_delta([c], [b]) == d2  # deterministic
    with pytest.raises(RanksError, match="same test split"):
        paired_delta([a], [_ranks([0, 0, 0], [0] * 6, np.repeat(np.arange(3), 2))])


def test_subset_recall_and_delta_count_only_the_subset_queries():
    """Table 6: recall of a subset of test images = their i2t queries and their captions' t2i queries."""
    t2i_map = np.repeat(np.arange(4), 2)
    # images 0-1: every query a hit at 1; images 2-3: an i2t hit at rank 3, captions missed
    a = _ranks([0, 0, 3, 3], [0, 0, 0, 0, 20, 20, 20, 20], t2i_map)
    b = _ranks([20, 20, 20, 20], [20] * 8, t2i_map)
    first, last = np.array([1, 1, 0, 0], bool), np.array([0, 0, 1, 1], bool)
    assert mean_recall([a], images=first) == pytest.approx(1.0)
    assert mean_recall([a], images=last) == pytest.approx((2 / 3) / 2)  # i2t R@5, R@10 hit; t2i none
    assert mean_recall([a]) == pytest.approx((0.5 + 1 + 1 + 0.5 + 0.5 + 0.5) / 6)  # i2t R@1,5,10; t2i R@1,5,10
    d = paired_delta([a], [b], images=last)
    assert d.diff == pytest.approx(1 / 3) and d.lo == pytest.approx(1 / 3) and d.hi == pytest.approx(1 / 3)
    with pytest.raises(RanksError, match="empty"):
        mean_recall([a], images=np.zeros(4, bool))
    with pytest.raises(RanksError, match="3 test images|4 test images"):
        mean_recall([a], images=np.ones(3, bool))


def test_features_concat_shifts_caption_offsets():
    """The teacher's heads train on train + teacher_extra: rows concatenate, image i of the second
    split keeps its own captions."""
    from cmapkd.distill.teacher import Features

    def feats(n_img, caps, base):
        off = torch.tensor([0, *np.cumsum(caps).tolist()])
        m = int(off[-1])
        return Features(torch.full((n_img, 2), base), [torch.full((n_img, 3), base)] * 4,
                        torch.arange(m).float()[:, None] + 100 * base, [torch.zeros(m, 5)] * 4, off)

    a, b = feats(2, [1, 2], 0.0), feats(3, [2, 1, 1], 1.0)
    c = Features.concat([a, b])
    assert c.n_images == 5 and c.offsets.tolist() == [0, 1, 3, 5, 6, 7]
    # image 3 (b's image 1) owns caption rows 5:6, which are b's caption row 2
    assert c.txt_final[c.offsets[3] : c.offsets[4], 0].tolist() == [102.0]
    assert Features.concat([a]) is a
