"""The baseline distillers (issue #7): registry and factory, hand-computed losses, terms that vanish
when the student matches the teacher, a frozen teacher, cached == online targets, the params
section, and a few real training steps of every baseline."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from cmapkd.config import ParamsError, load_params, read_params_file
from cmapkd.distill.baselines import (
    BASELINES,
    C2KDAdapted,
    CLIPKDDistiller,
    FitNetDistiller,
    KDDistiller,
    LLaVAKDAdapted,
    PromptKDAdapted,
    ScratchStudent,
    baseline_lrs,
    build_baseline,
    in_batch_kd,
    kendall_tau_b,
    kl_per_row,
    non_target_kd,
)
from cmapkd.distill.trainer import TrainSpec, train
from cmapkd.models.encoders import build_encoder
from cmapkd.models.ucmp import TeacherDims, compute_teacher_targets, language_levels, pyramid_grids, resample, target_grids

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["a red apple next to a small dog", "two cats on a sofa", "a rocket above the sea", "a tree and a house",
         "three stars over a tent", "a car behind a bus", "a fish in a bowl", "an owl on a branch"]
NAMES = ["scratch", "kd", "fitnet", "clipkd", "promptkd", "c2kd", "llavakd"]
TEACHER_BASED = NAMES[1:]
# the distillation terms each baseline logs (besides task/total/diag)
TERMS = {
    "scratch": set(),
    "kd": {"kd"},
    "fitnet": {"fitnet_v", "fitnet_l"},
    "clipkd": {"crd", "icl", "fd"},
    "promptkd": {"promptkd_img", "promptkd_txt"},
    "c2kd": {"c2kd_ntkd", "c2kd_proxy"},
    "llavakd": {"mdist_res", "mdist_vis", "rdist"},
}


@pytest.fixture(scope="module")
def params():
    """Overrides conftest's `params`: the baselines section too (the teacher/student fixtures use it)."""
    return load_params(["model", "loss", "baselines"], path=ROOT / "params.yaml")


def fresh_student(params):
    torch.manual_seed(0)
    return build_encoder(params.model.student)


def images(n=4, size=128, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def has_grad(module_or_params) -> bool:
    ps = module_or_params.parameters() if isinstance(module_or_params, torch.nn.Module) else module_or_params
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in ps)


def tower_params(student, which: str) -> list:
    """The parameters of the image or the text tower (open_clip towers only reference the CLIP,
    which the dual encoder owns)."""
    if hasattr(student, "clip"):
        named = list(student.clip.named_parameters())
        return [p for n, p in named if n.startswith("visual.") == (which == "image")]
    return list(getattr(student, which).parameters())


def towers_have_grad(student) -> bool:
    return has_grad(tower_params(student, "image")) and has_grad(tower_params(student, "text"))


def with_cfg(params, **changes):
    """A copy of params.baselines with some top-level keys changed."""
    return dataclasses.replace(params.baselines, **changes)


# ------------------------------------------------------------------ registry, factory, params


def test_registry_factory_and_learning_rates(params, teacher):
    assert list(BASELINES) == NAMES
    assert BASELINES["scratch"] is ScratchStudent and BASELINES["llavakd"] is LLaVAKDAdapted
    with pytest.raises(ValueError, match="unknown baseline 'hinton'.*scratch, kd, fitnet, clipkd, promptkd, c2kd, llavakd"):
        build_baseline("hinton", params, fresh_student(params))
    with pytest.raises(ValueError, match="unknown baseline 'FitNet'"):
        baseline_lrs("FitNet", params)
    b = params.baselines
    assert baseline_lrs("kd", params) == {"student": b.kd.lr}
    assert baseline_lrs("fitnet", params) == {"student": b.fitnet.lr, "adapters": b.fitnet.lr}
    student = fresh_student(params)
    for name in NAMES:
        d = build_baseline(name, params, student, teacher=teacher)
        assert isinstance(d, BASELINES[name])
        lrs = baseline_lrs(name, params)
        assert set(lrs) == set(d.group_names)
        groups = d.param_groups(lrs, weight_decay=0.1)
        assert {g["name"].removesuffix("_no_wd") for g in groups} == set(d.group_names), name
        in_groups = [id(p) for g in groups for p in g["params"]]
        assert len(in_groups) == len(set(in_groups)), name  # every parameter once
        teacher_ids = {id(p) for p in teacher.parameters()}
        assert not set(in_groups) & teacher_ids, name
        # every trainable parameter of the method (the teacher is not) is in a group
        assert set(in_groups) == {id(p) for p in d.parameters() if id(p) not in teacher_ids}, name


def test_teacher_widths_are_required_where_adapters_map_into_them(params):
    student = fresh_student(params)
    for cls in (FitNetDistiller, CLIPKDDistiller, PromptKDAdapted):
        with pytest.raises(ValueError, match="TeacherDims"):
            cls(student, params.baselines)
    # CLIP-KD projects only when the widths differ (as KDClipLoss)
    same = CLIPKDDistiller(student, params.baselines, teacher_dims=TeacherDims((1,) * 4, (1,) * 4, 256))
    other = CLIPKDDistiller(student, params.baselines, teacher_dims=TeacherDims((1,) * 4, (1,) * 4, 768))
    assert isinstance(same.heads.visual_proj, torch.nn.Identity)
    assert other.heads.visual_proj.weight.shape == (768, 256)
    bad = dataclasses.replace(params.baselines.fitnet, vis_level=5)
    with pytest.raises(ValueError, match="baselines.fitnet.vis_level"):
        FitNetDistiller(student, with_cfg(params, fitnet=bad), teacher_dims=TeacherDims((1,) * 4, (1,) * 4, 8))


def write(tmp_path: Path, raw: dict) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return p


def test_params_section_loads_and_rejects_mistakes(tmp_path):
    b = load_params(["baselines"], path=ROOT / "params.yaml").baselines
    assert b.methods == NAMES
    assert all(getattr(b, m).lr > 0 for m in NAMES)
    assert (b.task_weight, b.teacher_logit_scale) == (1.0, 100.0)
    assert (b.clipkd.crd_weight, b.clipkd.icl_weight, b.clipkd.fd_weight) == (1.0, 1.0, 2000.0)  # CLIP-KD's script
    assert isinstance(b.kd.temperature, float) and isinstance(b.fitnet.vis_level, int)
    good = read_params_file(ROOT / "params.yaml")

    raw = yaml.safe_load(yaml.safe_dump(good))
    raw["baselines"]["kd"]["temprature"] = 2.0
    with pytest.raises(ParamsError, match=r"unknown key 'baselines.kd.temprature' \(did you mean 'temperature'\?\)"):
        load_params(["baselines"], path=write(tmp_path, raw))

    raw = yaml.safe_load(yaml.safe_dump(good))
    raw["baselines"]["fitnet"]["normalize"] = "yes"
    with pytest.raises(ParamsError, match="key 'baselines.fitnet.normalize' expects bool"):
        load_params(["baselines"], path=write(tmp_path, raw))

    raw = yaml.safe_load(yaml.safe_dump(good))
    raw["baselines"]["methods"] = ["kd", "hinton"]
    with pytest.raises(ParamsError, match=r"key 'baselines.methods\[1\]' expects"):
        load_params(["baselines"], path=write(tmp_path, raw))

    raw = yaml.safe_load(yaml.safe_dump(good))
    raw["baselines"]["c2kd"]["proxy_init"] = "pretrained"
    with pytest.raises(ParamsError, match=r"baselines.c2kd.proxy_init.*pretrained"):
        load_params(["baselines"], path=write(tmp_path, raw))

    raw = yaml.safe_load(yaml.safe_dump(good))
    del raw["baselines"]["c2kd"]["krc"]
    with pytest.raises(ParamsError, match=r"missing key 'baselines.c2kd.krc' \(float\)"):
        load_params(["baselines"], path=write(tmp_path, raw))


# ------------------------------------------------------------------ losses on hand-computed cases


def hand_kl(teacher_row, student_row, T):
    """T^2 * KL(softmax(t / T) || softmax(s / T)) for one row, with math only."""
    zt = [math.exp(v / T) for v in teacher_row]
    zs = [math.exp(v / T) for v in student_row]
    pt = [v / sum(zt) for v in zt]
    ps = [v / sum(zs) for v in zs]
    return T * T * sum(a * math.log(a / b) for a, b in zip(pt, ps))


def test_kd_matches_a_hand_computed_2x2_case(params, student):
    # student: identity embeddings, scale 2 -> logits [[2, 0], [0, 2]];
    # teacher: scale 1, images [1, 0] and [0.6, 0.8], texts = identity -> logits [[1, 0], [0.6, 0.8]]
    eye = torch.eye(2)
    t_img = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    T = 2.0
    kd_cfg = dataclasses.replace(params.baselines.kd, temperature=T)
    d = KDDistiller(student, with_cfg(params, teacher_logit_scale=1.0, kd=kd_cfg))
    f = {"image_features": eye, "text_features": eye, "logit_scale": torch.tensor(2.0), "t_img": t_img, "t_txt": eye}
    out = d.compute_losses(f)
    i2t = (hand_kl([1.0, 0.0], [2.0, 0.0], T) + hand_kl([0.6, 0.8], [0.0, 2.0], T)) / 2  # rows
    t2i = (hand_kl([1.0, 0.6], [2.0, 0.0], T) + hand_kl([0.0, 0.8], [0.0, 2.0], T)) / 2  # columns
    assert float(out["diag/kd_i2t"]) == pytest.approx(i2t, rel=1e-5)
    assert float(out["diag/kd_t2i"]) == pytest.approx(t2i, rel=1e-5)
    assert float(out["kd"]) == pytest.approx(params.baselines.kd.weight * (i2t + t2i) / 2, rel=1e-5)
    assert i2t != pytest.approx(t2i)  # the two directions differ here: both are really computed
    # a symmetric case, checked against a number worked out by hand:
    # teacher rows softmax([0.3, 0.4]) = [0.47502, 0.52498], student softmax([1, 0]) = [0.73106, 0.26894]
    # KL = 0.47502 ln(0.47502/0.73106) + 0.52498 ln(0.52498/0.26894) = 0.14634; x T^2 = 0.58536
    s_logits, t_logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([[0.6, 0.8], [0.8, 0.6]])
    a, b = in_batch_kd(s_logits, t_logits, T)
    assert float(a) == pytest.approx(0.58536, abs=2e-4) and float(b) == pytest.approx(0.58536, abs=2e-4)
    assert float(kl_per_row(t_logits, t_logits, T).abs().max()) < 1e-7
    # the total is the sum of the weighted terms
    assert float(out["total"]) == pytest.approx(float(out["task"] + out["kd"]), rel=1e-6)


def test_kendall_tau_b_matches_scipy_with_ties():
    scipy_stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 5, (6, 9), generator=g).float()  # many ties
    y = torch.randn(6, 9, generator=g)
    y[0] = x[0] * 2 + 1  # perfectly concordant -> 1
    y[1] = -x[1]  # perfectly discordant -> -1
    y[2, :4] = 0.0  # ties in y too
    tau = kendall_tau_b(x, y)
    for i in range(6):
        ref = scipy_stats.kendalltau(x[i].numpy(), y[i].numpy())[0]
        assert float(tau[i]) == pytest.approx(float(ref), abs=1e-6), i
    assert float(tau[0]) == pytest.approx(1.0) and float(tau[1]) == pytest.approx(-1.0)
    assert float(kendall_tau_b(torch.ones(1, 5), torch.randn(1, 5))[0]) == 0.0  # constant row: no selection


def test_non_target_kd_ignores_the_paired_entry_and_respects_the_selection():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 4, generator=g), torch.randn(4, 4, generator=g)
    keep = torch.ones(4)
    base = non_target_kd(s, t, keep)
    s2, t2 = s.clone(), t.clone()
    s2.diagonal().add_(5.0)
    t2.diagonal().sub_(3.0)
    assert float(non_target_kd(s2, t2, keep)) == pytest.approx(float(base), rel=1e-6)  # the target is not in it
    assert float(base) > 0
    assert float(non_target_kd(s, t, torch.zeros(4))) == 0.0
    half = non_target_kd(s, t, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert 0 < float(half) < float(base)  # masked rows count as zero, the mean is over all rows


# ------------------------------------------------------------------ terms vanish when student == teacher


@torch.no_grad()
def self_targets(student, imgs, ids, mask):
    """Teacher targets made from the student itself (what a perfect student would match)."""
    student.eval()
    img = student.image(student.image.prepare(imgs))
    txt = student.text(ids, mask)
    grids = target_grids([lv.shape[-2:] for lv in img.levels], pyramid_grids(student.image.image_size))
    t = {f"t_vis_l{i + 1}": resample(lv, g) for i, (lv, g) in enumerate(zip(img.levels, grids))}
    t.update({f"t_txt_l{j + 1}": v for j, v in enumerate(language_levels(txt))})
    E = img.embedding.shape[-1]
    t.update(t_img_emb=F.normalize(img.embedding, dim=-1), t_txt_emb=F.normalize(txt.embedding, dim=-1),
             t_vis_pool=torch.randn(len(imgs), 4, E), t_txt_pool=torch.randn(len(imgs), 4, E))
    return t


def test_distillation_terms_vanish_when_the_student_is_its_own_teacher(params):
    student = fresh_student(params).eval()
    dims = TeacherDims(tuple(student.image.level_channels), tuple(student.text.level_dims), student.image.embed_dim)
    ids, mask = student.tokenize(TEXTS[:4])
    imgs = images(4, 64)
    t = self_targets(student, imgs, ids, mask)
    # same logit scale on both sides, so the similarity distributions agree exactly
    cfg = with_cfg(params, teacher_logit_scale=float(student.logit_scale.detach().exp()))
    fit = FitNetDistiller(student, cfg, teacher_dims=dims)
    with torch.no_grad():  # identity regressors make "student == teacher" expressible
        C, D = student.image.level_channels[1], student.text.level_dims[1]
        fit.regressors["vis"].weight.copy_(torch.eye(C).view(C, C, 1, 1))
        fit.regressors["vis"].bias.zero_()
        fit.regressors["txt"].weight.copy_(torch.eye(D))
        fit.regressors["txt"].bias.zero_()
    cases = [
        (KDDistiller(student, cfg), ["kd"]),
        (fit, ["fitnet_v", "fitnet_l"]),
        (CLIPKDDistiller(student, cfg, teacher_dims=dims), ["crd", "fd"]),  # equal widths: no projection
        (LLaVAKDAdapted(student, cfg), ["mdist_res", "mdist_vis", "rdist"]),
    ]
    noisy = {k: v + 0.5 * torch.randn(v.shape, generator=torch.Generator().manual_seed(2)) for k, v in t.items()}
    for d, keys in cases:
        d.eval()
        with torch.no_grad():
            out = d(imgs, ids, mask, targets=t)
            out_noisy = d(imgs, ids, mask, targets=noisy)
        for k in keys:
            assert float(out[k]) == pytest.approx(0.0, abs=1e-5), (type(d).__name__, k)
            assert float(out_noisy[k]) > 1e-4, (type(d).__name__, k)  # and the test can fail
        assert float(out["task"]) > 0  # the task loss is not a distillation term


def test_promptkd_and_c2kd_terms_vanish_on_matching_logits(params, student):
    g = torch.Generator().manual_seed(3)
    img = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    other = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    scale = torch.tensor(params.baselines.teacher_logit_scale)
    base = {"image_features": img, "text_features": txt, "logit_scale": scale, "t_img": img, "t_txt": txt}
    pk = PromptKDAdapted(student, params.baselines, teacher_dims=TeacherDims((1,) * 4, (1,) * 4, 8))
    out = pk.compute_losses({**base, "img_proj": img, "txt_proj": txt})
    assert float(out["promptkd_img"]) == pytest.approx(0.0, abs=1e-5)
    assert float(out["promptkd_txt"]) == pytest.approx(0.0, abs=1e-5)
    out = pk.compute_losses({**base, "img_proj": other, "txt_proj": txt})
    assert float(out["promptkd_img"]) > 1e-3 and float(out["promptkd_txt"]) == pytest.approx(0.0, abs=1e-5)
    out = pk.compute_losses({**base, "img_proj": img, "txt_proj": other})
    assert float(out["promptkd_txt"]) > 1e-3 and float(out["promptkd_img"]) == pytest.approx(0.0, abs=1e-5)

    c2 = C2KDAdapted(student, params.baselines)
    out = c2.compute_losses({**base, "proxy_img": img, "proxy_txt": txt})
    assert float(out["c2kd_proxy"]) == pytest.approx(0.0, abs=1e-5)
    assert float(out["c2kd_ntkd"]) == pytest.approx(0.0, abs=1e-5)
    assert float(out["diag/c2kd_kept_frac"]) == 1.0 and float(out["diag/c2kd_kendall"]) == pytest.approx(1.0)
    out = c2.compute_losses({**base, "proxy_img": other, "proxy_txt": txt})
    assert float(out["c2kd_proxy"]) > 1e-3
    # OFSD: a proxy that ranks every row like the teacher keeps all rows; reversed rankings keep none
    rev = c2.compute_losses({**base, "image_features": img, "t_img": img, "proxy_img": -img, "proxy_txt": txt})
    assert float(rev["diag/c2kd_kept_frac"]) == 0.0 and float(rev["c2kd_ntkd"]) == 0.0


def test_c2kd_aligned_proxies_start_as_the_students_level_heads_and_train_apart(params, student):
    """`proxy_init: aligned`: each proxy starts as a copy of the student's aligned level head at
    `proxy_level`, so its first logits are the student's own level-k retrieval logits; the copy
    shares no parameter with the student. `random` (C2KD's literal init) starts elsewhere."""
    k = params.baselines.c2kd.proxy_level - 1
    imgs = student.image.prepare(images(3))
    ids, mask = student.tokenize(["a cat on a mat", "two dogs in the snow", "a red bus"])
    with torch.no_grad():
        io, to = student.image(imgs), student.text(ids, mask)
        v, l = io.levels[k].mean(dim=(2, 3)), language_levels(to)[k]
        want_img = F.normalize(student.image.level_embed(k, v), dim=-1)
        want_txt = F.normalize(student.text.level_embed(k, l), dim=-1)

        aligned = C2KDAdapted(student, params.baselines)
        f = aligned._features(io, to, None, None)
        assert torch.allclose(f["proxy_img"], want_img, atol=1e-5)
        assert torch.allclose(f["proxy_txt"], want_txt, atol=1e-5)
        random = C2KDAdapted(student, with_cfg(params, c2kd=dataclasses.replace(params.baselines.c2kd, proxy_init="random")))
        fr = random._features(io, to, None, None)
        assert not torch.allclose(fr["proxy_img"], want_img, atol=1e-2)

    ids_student = {id(p) for p in student.parameters()}
    assert all(id(p) not in ids_student for p in aligned.proxies.parameters())
    # a step on the proxy changes the proxy, not the student's level head
    with torch.no_grad():
        for p in aligned.proxies["img"].base.parameters():
            p.add_(0.5)
        assert torch.allclose(F.normalize(student.image.level_embed(k, v), dim=-1), want_img, atol=1e-6)
        assert not torch.allclose(aligned._features(io, to, None, None)["proxy_img"], want_img, atol=1e-3)


# ------------------------------------------------------------------ frozen teacher, cached == online


@pytest.fixture(scope="module")
def cached_batches(params, teacher):
    """8 image-caption pairs with the teacher's targets stored as fp16 rows, like the cache."""
    imgs = images(8, 128, seed=5)
    ids, mask = teacher.tokenize(TEXTS)
    grids = pyramid_grids(params.model.student.image_size)
    t = {k: v.half() for k, v in compute_teacher_targets(teacher.eval(), imgs, ids, mask, grids).items()}
    return imgs, ids, mask, t


def test_gradients_reach_the_student_not_the_teacher_and_cached_targets_match_online(params, teacher, cached_batches):
    imgs, ids, mask, t = cached_batches
    imgs, ids, mask = imgs[:4], ids[:4], mask[:4]
    cached = {k: v[:4] for k, v in t.items()}
    for name in TEACHER_BASED:
        student = fresh_student(params)
        d = build_baseline(name, params, student, teacher=teacher)
        d.train()
        assert not d.teacher.training and not any(p.requires_grad for p in d.teacher.parameters())
        torch.manual_seed(0)  # the same dropout masks in both passes (the student's BERT layers drop out)
        out = d(imgs, ids, mask)  # online: the teacher runs inside
        assert set(k for k in out if not k.startswith("diag/")) == {"task", "total"} | TERMS[name], name
        assert all(v.dim() == 0 for v in out.values())
        named = [v for k, v in out.items() if k != "total" and not k.startswith("diag/")]
        assert torch.allclose(out["total"], sum(named))
        out["total"].backward()
        assert all(p.grad is None for p in d.teacher.parameters()), name
        assert towers_have_grad(student), name
        for m in d.group_modules().get("adapters", []):
            assert has_grad(m), name

        # cached fp16 targets (what the cache stores) give the online losses (same mode, same input)
        student.zero_grad()
        torch.manual_seed(0)
        from_cache = d(imgs, ids, mask, targets=cached)
        for k in out:
            assert float(from_cache[k].detach()) == pytest.approx(float(out[k].detach()), rel=2e-2, abs=5e-3), (name, k)
        # the distillation terms alone reach the student too (not only through the task loss)
        sum(v for k, v in from_cache.items() if k in TERMS[name]).backward()
        assert towers_have_grad(student), name
        assert all(p.grad is None for p in d.teacher.parameters()), name

        # without a teacher, a batch without targets is an error naming the missing keys
        d_off = build_baseline(name, params, student, teacher_dims=TeacherDims.from_targets(cached))
        with pytest.raises(KeyError, match="t_img_emb"):
            d_off(imgs, ids, mask)


# ------------------------------------------------------------------ the real training loop


def test_every_baseline_trains_a_few_steps_with_the_shared_loop(params, cached_batches, tmp_path):
    imgs, ids, mask, t = cached_batches
    dims = TeacherDims.from_targets(t)

    def make_batch(idx, epoch):
        return {"images": imgs[idx], "text_ids": ids[idx], "text_mask": mask[idx], **{k: v[idx] for k, v in t.items()}}

    for name in NAMES:
        student = fresh_student(params)
        d = build_baseline(name, params, student, teacher_dims=dims)
        before = [p.detach().clone() for p in tower_params(student, "image")]
        # 4 pairs, batches of 2: two optimizer steps (the CPU is shared: keep it small)
        spec = TrainSpec(stage=name, epochs=1, batch_size=2, lrs=baseline_lrs(name, params), ckpt_every=0, seed=0)
        res = train(d, 4, make_batch, spec, torch.device("cpu"), tmp_path / name, None, progress=False)
        assert res.steps == 2, name
        for row in res.history:
            losses = {k[5:]: v for k, v in row.items() if k.startswith("loss/")}
            assert set(losses) == {"task", "total"} | TERMS[name], name
            assert all(math.isfinite(v) for v in losses.values()), (name, losses)
            assert {k[3:].removesuffix("_no_wd") for k in row if k.startswith("lr/")} == set(d.group_names), name
        assert any(not torch.equal(a, b) for a, b in zip(before, tower_params(student, "image"))), name
