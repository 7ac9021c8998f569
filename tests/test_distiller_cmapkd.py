"""The CMAPKD distiller: frozen teacher, cached vs online targets, phases, groups, paper pair."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
import torch
import yaml

from cmapkd import config
from cmapkd.config import load_params
from cmapkd.distill.base import Distiller
from cmapkd.distill.cmapkd import CMAPKDDistiller
from cmapkd.models.encoders import build_encoder
from cmapkd.models.ucmp import TARGET_KEYS, TeacherDims

ROOT = Path(__file__).resolve().parents[1]
LRS = {"student": 1e-4, "adapters": 1e-4, "alsn": 1e-4}
TEXTS = ["a red apple next to a small dog", "two cats on a sofa", "a rocket above the sea", "a tree and a house"]


@pytest.fixture(scope="module")
def params():
    return load_params(["model", "loss", "lambda1", "lambda2", "lambda3", "lambda4"], path=ROOT / "params.yaml")


@pytest.fixture(scope="module")
def teacher(params):
    torch.manual_seed(0)
    return build_encoder(params.model.teacher)


def make(params, teacher=None, **loss_changes) -> CMAPKDDistiller:
    torch.manual_seed(0)
    student = build_encoder(params.model.student)
    loss = dataclasses.replace(params.loss, **loss_changes)
    lambdas = (params.lambda1, params.lambda2, params.lambda3, params.lambda4)
    dims = None if teacher is not None else TeacherDims((24, 48, 120, 352), (384,) * 4, 256)
    return CMAPKDDistiller(student, params.model, loss, lambdas, teacher=teacher, teacher_dims=dims)


def batch(d, n=4):
    g = torch.Generator().manual_seed(0)
    ids, mask = d.student.tokenize(TEXTS[:n])
    return torch.rand(n, 3, 128, 128, generator=g), ids, mask


def test_online_teacher_is_frozen_in_eval_and_gets_no_gradients(params, teacher):
    d = make(params, teacher)
    assert isinstance(d, Distiller)
    d.train()
    assert not d.teacher.training and all(not m.training for m in d.teacher.modules())
    assert not any(p.requires_grad for p in d.teacher.parameters())
    assert d.student.training
    out = d(*batch(d))
    named = {k: v for k, v in out.items() if not k.startswith("diag/") and k != "total"}
    assert set(named) == set(params.loss.terms)
    assert torch.allclose(out["total"], sum(named.values()))
    assert all(v.dim() == 0 for v in out.values())  # diagnostics are scalars (logged as floats)
    out["total"].backward()
    assert all(p.grad is None for p in d.teacher.parameters())
    assert d.student.logit_scale.grad is not None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.ucmp.parameters())
    # the teacher parameters are not in any optimizer group
    ids = {id(p) for g in d.param_groups(LRS) for p in g["params"]}
    assert not ids & {id(p) for p in d.teacher.parameters()}


def test_cached_fp16_targets_match_the_online_teacher(params, teacher):
    d = make(params, teacher).eval()
    images, ids, mask = batch(d)
    targets = d.teacher_targets(images, ids, mask)
    assert set(targets) == set(TARGET_KEYS)
    cached = {k: v.half() for k, v in targets.items()}  # what the cache stores
    with torch.no_grad():
        online = d(images, ids, mask)
        from_cache = d(images, ids, mask, targets=cached)
    for k in online:
        assert float(from_cache[k]) == pytest.approx(float(online[k]), rel=2e-2, abs=2e-3), k
    # without a teacher, a batch without targets is an error that names the keys
    d_off = make(params, None)
    with pytest.raises(KeyError, match="t_vis_l1"):
        d_off(images, ids, mask)
    with torch.no_grad():
        assert float(d_off(images, ids, mask, targets=cached)["total"]) > 0


def test_intra_and_relation_are_zero_when_student_features_equal_the_targets(params):
    torch.manual_seed(0)
    student = build_encoder(params.model.student)
    C, D = params.model.pyramid_channels, student.text.level_dims[0]
    d = CMAPKDDistiller(student, params.model, params.loss, (1.0, 0.5, 0.3, 0.1), teacher_dims=TeacherDims((C,) * 4, (D,) * 4, C))
    d.eval()
    with torch.no_grad():  # identity adapters, so that "student == teacher" is expressible
        for conv in d.ucmp.vis_adapters:
            conv.weight.copy_(torch.eye(C).view(C, C, 1, 1))
            conv.bias.zero_()
        for lin in d.ucmp.txt_adapters:
            lin.weight.copy_(torch.eye(D))
            lin.bias.zero_()
    images, ids, mask = batch(d)
    with torch.no_grad():
        s = d._student(images, ids, mask)
    t = {f"t_vis_l{i + 1}": p.detach() for i, p in enumerate(s["pyramid"])}
    t.update({f"t_txt_l{j + 1}": s["txt_vec"][:, j].detach() for j in range(4)})
    t.update(t_vis_pool=s["vis_vec"].detach(), t_txt_pool=torch.randn(4, 4, C), t_img_emb=torch.randn(4, C),
             t_txt_emb=torch.randn(4, C))
    with torch.no_grad():
        out = d(images, ids, mask, targets=t)
    for k in ("intra_v", "intra_l", "relation_sample", "relation_layer"):
        assert float(out[k]) == pytest.approx(0.0, abs=1e-6), k
    noisy = {k: v + 0.5 * torch.randn_like(v) for k, v in t.items()}
    with torch.no_grad():
        out2 = d(images, ids, mask, targets=noisy)
    for k in ("intra_v", "intra_l", "relation_sample", "relation_layer"):
        assert float(out2[k]) > 1e-5, k


def test_level_selection_and_weight_modes(params, teacher):
    d = make(params, teacher).eval()
    images, ids, mask = batch(d)
    d.set_levels([4], [4])
    f = d.compute_features({"images": images, "text_ids": ids, "text_mask": mask})
    assert torch.equal(f["intra_v"][:, :3], torch.zeros(4, 3)) and (f["intra_v"][:, 3] > 0).all()
    assert torch.equal(f["w_v"], torch.tensor([[0.0, 0, 0, 1]]).expand(4, 4))
    out = d.compute_losses(f)
    assert float(out["relation_layer"]) == 0.0  # one level: no level correlation
    d.set_levels([1, 2, 3, 4], [1, 2, 3, 4])
    d.set_level_weights("manual", [0.1, 0.2, 0.3, 0.4])
    f = d.compute_features({"images": images, "text_ids": ids, "text_mask": mask})
    assert torch.allclose(f["w_l"], torch.tensor([0.1, 0.2, 0.3, 0.4]).expand(4, 4))
    d.set_level_weights("alsn")
    f = d.compute_features({"images": images, "text_ids": ids, "text_mask": mask})
    assert torch.allclose(f["w_v"].sum(-1), torch.ones(4)) and f["w_v"].std(0).sum() > 0
    with pytest.raises(ValueError, match="loss.vis_levels"):
        d.set_levels([0, 5], [4])


def test_phases_and_param_groups(params, teacher):
    d = make(params, teacher, level_weights="alsn", alpha_learned=True)
    groups = d.param_groups(LRS, weight_decay=0.1)
    names = [g["name"] for g in groups]
    assert names == ["student", "student_no_wd", "adapters", "adapters_no_wd", "alsn", "alsn_no_wd"]
    assert any(p is d.alpha_table for g in groups if g["name"].startswith("alsn") for p in g["params"])
    assert any(p is d.student.logit_scale for g in groups if g["name"] == "student_no_wd" for p in g["params"])
    with pytest.raises(KeyError, match="alsn"):
        d.param_groups({"student": 1e-4, "adapters": 1e-4})
    # stage 4a: the ALSN alone, with the diversity regulariser; student and adapters frozen, eval
    d.set_phase("policy")
    d.train()
    assert not d.student.training and not d.ucmp.training and d.alsn.training
    assert all(not p.requires_grad for p in d.student.parameters())
    out = d(*batch(d))
    assert "diversity" in out and float(out["diversity"].detach()) < 0
    out["total"].backward()
    assert all(p.grad is None for p in d.student.parameters()) and all(p.grad is None for p in d.ucmp.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.alsn.parameters())
    assert d.alpha_table.grad is not None
    # stages 1-3: ALSN frozen; 4b: everything trains
    d.set_phase("distill")
    assert all(not p.requires_grad for p in d.alsn.parameters()) and all(p.requires_grad for p in d.student.parameters())
    assert "diversity" not in d(*batch(d))
    d.set_phase("joint")
    assert all(p.requires_grad for p in d.parameters() if all(p is not q for q in d.teacher.parameters()))


def _paper_params():
    # random init: no hub in tests
    return config.load_params(["model", "loss", "lambda1", "lambda2", "lambda3", "lambda4", "setting"],
                              path=ROOT / "params.yaml", overlay=ROOT / "configs" / "paper.yaml",
                              overrides=["model.teacher.pretrained=''", "model.student.pretrained=''"])


def test_paper_params_overlay_is_valid():
    overlay = yaml.safe_load((ROOT / "configs" / "paper.yaml").read_text())
    # METHOD.md 1: the paper's student starts from pretrained weights and all of it fine-tunes
    assert overlay["model"]["student"]["pretrained"] == "openai"
    assert overlay["model"]["student"]["trainable_blocks"] == [-1, -1]
    p = _paper_params()
    assert p.setting == "paper"
    assert p.model.teacher.open_clip_model == "ViT-L-14-quickgelu" and p.model.teacher.image_taps == [6, 12, 18, 24]
    assert p.model.student.open_clip_model == "ViT-B-16" and p.model.student.text_taps == [3, 6, 9, 12]
    assert p.model.pyramid_channels == 256


@pytest.mark.slow
def test_paper_pair_forward_backward_on_cpu():
    """ViT-L-14 teacher (random init) -> ViT-B-16 student: one step on CPU (13 s on 2 idle cores,
    30+ s when they are shared; ~2 GB of memory)."""
    p = _paper_params()
    t0 = time.time()
    d = CMAPKDDistiller.from_params(p, teacher_online=True)
    d.train()
    assert d.student_grids() == [(56, 56), (28, 28), (14, 14), (7, 7)]
    ids, mask = d.student.tokenize(TEXTS[:2])
    assert ids.shape == (2, 77)
    images = torch.rand(2, 3, 224, 224)
    t = d.teacher_targets(images, ids, mask)
    assert t["t_vis_l1"].shape == (2, 1024, 16, 16) and t["t_vis_l4"].shape == (2, 1024, 7, 7)  # min(native 16, grid)
    assert t["t_vis_pool"].shape == (2, 4, 768) and t["t_txt_l1"].shape == (2, 768)
    out = d(images, ids, mask, targets=t)
    out["total"].backward()
    assert torch.isfinite(out["total"])
    assert all(p.grad is None for p in d.teacher.parameters())
    assert d.student.clip.visual.conv1.weight.grad is not None
    assert d.student.clip.token_embedding.weight.grad is not None
    print(f"paper pair build + forward/backward: {time.time() - t0:.1f} s")


def test_checkpoint_state_excludes_the_frozen_teacher(params, teacher):
    d = make(params, teacher)
    sd = d.state_dict()
    assert sd and not any(k.startswith("teacher.") for k in sd)
    assert any(k.startswith("student.image.") for k in sd) and any(k.startswith("ucmp.") for k in sd)
    d2 = make(params, teacher)
    with torch.no_grad():
        d2.ucmp.f_v2l.weight.add_(1.0)
    d2.load_state_dict(sd)
    assert torch.equal(d2.ucmp.f_v2l.weight, d.ucmp.f_v2l.weight)
    with pytest.raises(RuntimeError, match="missing keys"):
        d2.load_state_dict({k: v for k, v in sd.items() if not k.startswith("alsn.")})
