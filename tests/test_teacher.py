"""The teacher stage: heads trained on the teacher's own objective beat random heads, the saved
heads load back exactly and strictly, the loaded teacher is frozen, training is deterministic, and
the trained vectors are the ones compute_teacher_targets uses."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from data_fixtures import emoji_params
from safetensors.torch import load_file, save_file

from cmapkd.config import SplitSizes, load_params
from cmapkd.data import ImageTextDataset
from cmapkd.data.build import build_dataset
from cmapkd.distill import teacher as T
from cmapkd.models.encoders import build_encoder, freeze
from cmapkd.models.ucmp import compute_teacher_targets, pyramid_grids

ROOT = Path(__file__).resolve().parents[1]
TINY = ["teacher.epochs=30", "teacher.batch_size=16", "teacher.feature_batch_size=32", "teacher.warmup_frac=0.1",
        "teacher.splits=[train]"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("teacher-data") / "emojiscenes"
    build_dataset(emoji_params(0, splits=SplitSizes(train=48, val=16, test=4), zeroshot_emoji=0, fashion_mnist=0,
                               vqa_per_image=1), root, progress=False)
    return root


@pytest.fixture(scope="module")
def params():
    return load_params(["seed", "setting", "model", "teacher"], path=ROOT / "params.yaml", overrides=TINY)


@pytest.fixture(scope="module")
def stage(tmp_path_factory, data_root) -> dict:
    """The stage entry point, run once on the tiny set."""
    from cmapkd.stages.teacher import main

    base = tmp_path_factory.mktemp("teacher-out")
    out, metrics = base / "teacher", base / "metrics.json"
    argv = ["--params", str(ROOT / "params.yaml"), "--data", str(data_root), "--out", str(out),
            "--metrics", str(metrics), "--no-progress"] + [a for s in TINY for a in ("-S", s)]
    assert main(argv) == 0
    return {"out": out, "metrics": json.loads(metrics.read_text())}


@pytest.fixture(scope="module")
def feats(params, data_root):
    teacher = freeze(build_encoder(params.model.teacher))
    T.reset_heads(teacher, 0)
    train = T.extract_features(teacher, ImageTextDataset(data_root, "train"), 32, progress=False)
    return teacher, train


def test_stage_outputs_and_training_beats_random_heads(stage, params):
    m, out = stage["metrics"], stage["out"]
    assert m["trained"] and m["train_steps"] == 30 * 3
    assert m["val"]["retrieval_mean"] > m["val_random_heads"]["retrieval_mean"] + 0.1
    assert m["train_loss_last_epoch"]["total"] < m["train_loss_first_epoch"]["total"]
    spec = json.loads((out / T.SPEC_FILE).read_text())
    sd = load_file(str(out / T.WEIGHTS_FILE))
    assert sorted(sd) == sorted(spec["keys"])
    # heads of both towers + the logit scale, under DualEncoder.state_dict() names; no backbone weights
    assert {"image.proj.weight", "image.level_heads.3.bias", "text.proj.weight", "text.level_heads.0.weight",
            "_logit_scale"} <= set(sd)
    assert not any(".backbone." in k or ".encoder." in k for k in sd)
    assert float(sd["_logit_scale"]) <= T.LOGIT_SCALE_MAX + 1e-6
    assert spec["identity"]["weights_sha256"] and spec["data"]["digest"] and spec["training"]["seed"] == params.seed
    assert spec["metrics"]["val"] == m["val"]


def test_load_teacher_round_trips_and_is_frozen(stage, params, data_root):
    teacher = T.load_teacher(params.model, stage["out"])
    assert not teacher.training and all(not mod.training for mod in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    sd = load_file(str(stage["out"] / T.WEIGHTS_FILE))
    own = teacher.state_dict()
    assert all(torch.equal(own[k], v) for k, v in sd.items())
    # full forward of the loaded teacher reproduces the val retrieval the stage measured on features
    val = ImageTextDataset(data_root, "val")
    img, txt = T.encode_split(teacher, val, 32, progress=False)
    again = T.retrieval_metrics(img, txt, val.text_to_image())
    assert all(abs(again[k] - v) < 1e-5 for k, v in stage["metrics"]["val"].items())


def _copy(stage, tmp_path, spec: bool = True) -> Path:
    d = tmp_path / "teacher"
    shutil.copytree(stage["out"], d)
    if not spec:
        (d / T.SPEC_FILE).unlink()
    return d


@pytest.mark.parametrize("with_spec", [True, False])
def test_bad_weights_files_are_clear_errors(stage, params, tmp_path, with_spec):
    d = _copy(stage, tmp_path, with_spec)
    path = d / T.WEIGHTS_FILE
    good = load_file(str(path))

    bad = {k: v for k, v in good.items() if k != "text.level_heads.2.weight"}
    save_file(bad, str(path))
    with pytest.raises(T.TeacherError, match=r"teacher\.safetensors: missing .*text\.level_heads\.2\.weight"):
        T.load_teacher(params.model, d)

    bad = dict(good, **{"image.proj.weight": torch.zeros(3, 4)})
    save_file(bad, str(path))
    with pytest.raises(T.TeacherError, match=r"teacher\.safetensors: tensor 'image\.proj\.weight' has shape \(3, 4\)"):
        T.load_teacher(params.model, d)

    bad = dict(good, **{"image.nonsense": torch.zeros(2)})
    save_file(bad, str(path))
    with pytest.raises(T.TeacherError, match=r"teacher\.safetensors: keys that are not in the teacher.*image\.nonsense"):
        T.load_teacher(params.model, d)

    path.unlink()
    with pytest.raises(FileNotFoundError, match=r"teacher\.safetensors"):
        T.load_teacher(params.model, d)


def test_changed_params_are_an_error_not_a_silent_reuse(stage, params, tmp_path):
    d = _copy(stage, tmp_path)
    changed = dataclasses.replace(params.model.teacher, text_taps=[1, 3, 5, 6])
    with pytest.raises(T.TeacherError, match=r"spec\.json: the teacher built from params differs .*text"):
        T.load_teacher(changed, d)


def test_training_is_deterministic(params, feats):
    teacher, train = feats
    tp = dataclasses.replace(params.teacher, epochs=3)
    states = []
    for seed in (0, 0, 1):
        T.reset_heads(teacher, seed)
        T.train_teacher(teacher, tp, seed, train_feats=train, progress=False)
        states.append(T.head_state(teacher, T.trained_keys(teacher)))
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not torch.equal(states[0]["image.proj.weight"], states[2]["image.proj.weight"])
    # the caption of image i in an epoch depends on (seed, epoch, i) only
    c = T.caption_choice(train.offsets, 0, 2)
    assert torch.equal(c, T.caption_choice(train.offsets, 0, 2))
    assert ((c >= train.offsets[:-1]) & (c < train.offsets[1:])).all()


def test_trained_vectors_are_the_ones_compute_teacher_targets_uses(feats, data_root):
    """Training on cached features, training by full forward and the distillation targets agree."""
    teacher, train = feats
    ds = ImageTextDataset(data_root, "train")
    rows = torch.tensor([0, 5, 7])
    caps = train.offsets[rows] + 1
    flat = ds.flat_captions()
    images = T._images_tensor(ds.images, rows.tolist())
    ids, mask = teacher.tokenize([flat[int(c)] for c in caps])
    with torch.no_grad():
        from_feats = T.embed_features(teacher, train, rows, caps)
        full = T.embed_batch(teacher, images, ids, mask)
        targets = compute_teacher_targets(teacher, images, ids, mask, student_grids=pyramid_grids(64))
    for k in from_feats:
        torch.testing.assert_close(from_feats[k], full[k], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(from_feats["img_lv"], targets["t_vis_pool"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(from_feats["txt_lv"], targets["t_txt_pool"], atol=1e-4, rtol=1e-4)


def test_tuning_last_blocks_saves_and_loads_them(params, data_root, tmp_path):
    p = dataclasses.replace(params, teacher=dataclasses.replace(params.teacher, tune_last_blocks=1, epochs=1))
    m = T.run_teacher_stage(p, data_root, tmp_path / "t", tmp_path / "m.json", progress=False)
    assert m["train_steps"] == 3
    spec = json.loads((tmp_path / "t" / T.SPEC_FILE).read_text())
    assert any(k.startswith("text.encoder.encoder.layer.5.") for k in spec["keys"])
    assert any(k.startswith("image.backbone.conv_head.") for k in spec["keys"])
    teacher = T.load_teacher(params.model, tmp_path / "t")
    base = build_encoder(params.model.teacher).state_dict()
    k = next(k for k in spec["keys"] if k.startswith("text.encoder.encoder.layer.5.") and k.endswith("weight"))
    assert not torch.equal(teacher.state_dict()[k], base[k])  # the tuned block was trained and loaded back
    assert not any(p.requires_grad for p in teacher.parameters())


def test_open_clip_teacher_writes_only_a_spec(params, data_root, tmp_path):
    """Paper-setting path (open_clip kind, here a tiny open_clip config at random init: no hub)."""
    from cmapkd.config import EncoderSpec

    tiny = EncoderSpec(kind="open_clip", image_size=64, image_taps=[1, 2, 3, 4], text_taps=[1, 2, 3, 4],
                       context_length=32, embed_dim=256, open_clip_model="CMAPKD-Tiny-8-64")
    p = dataclasses.replace(params, model=dataclasses.replace(params.model, teacher=tiny))
    torch.manual_seed(0)
    m = T.run_teacher_stage(p, data_root, tmp_path / "t", None, progress=False)
    assert not m["trained"] and "val_random_heads" not in m and 0 <= m["val"]["retrieval_mean"] <= 1
    assert sorted(x.name for x in (tmp_path / "t").iterdir()) == [T.SPEC_FILE]
    torch.manual_seed(0)
    teacher = T.load_teacher(p.model, tmp_path / "t")
    assert not any(q.requires_grad for q in teacher.parameters())


def test_recorded_identity_is_the_teachers_and_only_for_the_same_params(stage, params):
    """Cached-target runs check the cache against spec.json's identity without building the teacher:
    it must equal the identity of the teacher that load_teacher builds, and be refused (None) when
    params describe another teacher."""
    import dataclasses

    assert T.recorded_identity(params.model, stage["out"]) == T.load_teacher(params.model, stage["out"]).identity()
    other = dataclasses.replace(params.model.teacher, text_taps=[1, 2, 3, 6])
    assert T.recorded_identity(other, stage["out"]) is None
    assert T.recorded_identity(params.model, stage["out"].parent / "missing") is None
