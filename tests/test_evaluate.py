"""The evaluate stage: complete metrics in range, deterministic, figure arrays of CMAPKD models and
the teacher, strict model loading with errors naming the file, and (on the real data, when it is
there) a trained teacher that beats a random student."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import emoji_params
from safetensors.torch import load_file, save_file

from cmapkd.config import SplitSizes, load_params
from cmapkd.data import ImageTextDataset
from cmapkd.data.build import build_dataset
from cmapkd.eval import run as R

ROOT = Path(__file__).resolve().parents[1]
KEYS = ["seed", "setting", "model", "loss", "distill", "lambda1", "lambda2", "lambda3", "lambda4", "evaluate",
        "teacher"]
# small and fast: a tiny dataset, a 2-epoch probe, one latency call per batch size
FAST = ["evaluate.batch_size=16", "evaluate.vqa_probe.epochs=2", "evaluate.vqa_probe.train_images=0",
        "evaluate.vqa_probe.hidden=32", "evaluate.latency.warmup=0", "evaluate.latency.repeats=1",
        "teacher.epochs=5", "teacher.batch_size=8", "teacher.feature_batch_size=32", "teacher.splits=[train]"]
N_FIG = 6
ZS = ["emoji_groups", "fashion_mnist"]
REAL_DATA = ROOT / "data" / "processed" / "emojiscenes"
REAL_TEACHER = ROOT / "models" / "teacher"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny forward passes: one thread is as fast on an idle machine and 10x faster on a busy one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def params():
    return load_params(KEYS, path=ROOT / "params.yaml", overrides=FAST)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval-data") / "emojiscenes"
    build_dataset(emoji_params(0, splits=SplitSizes(train=16, val=4, test=10), zeroshot_emoji=9, fashion_mnist=10,
                               vqa_per_image=3), root, progress=False)  # answer types cycle: all three
    return root


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, params, data_root) -> Path:
    """A real teacher stage output (spec.json + heads) trained for a few steps on the tiny set."""
    from cmapkd.distill.teacher import run_teacher_stage

    out = tmp_path_factory.mktemp("eval-teacher") / "teacher"
    run_teacher_stage(params, data_root, out, progress=False, device="cpu")
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory, params, teacher_dir) -> dict[str, Path]:
    """Random-weight model folders as the training stages write them: a CMAPKD distiller and a
    scratch student (its `student.*` entries only)."""
    from cmapkd.distill.runs import build_method, save_state

    base = tmp_path_factory.mktemp("eval-models")
    torch.manual_seed(0)
    method = build_method(params, "stage4b", None, R.teacher_dims_of(params, teacher_dir))
    out = {}
    for name, state, summary in (
        ("cmapkd-s0", method.state_dict(), {"run": "stage4b", "method": "cmapkd", "seed": 0}),
        ("scratch-s1", {"student." + k: v for k, v in method.student.state_dict().items()},
         {"run": "scratch", "method": "scratch", "seed": 1}),
    ):
        d = base / name
        d.mkdir()
        save_file({k: v.contiguous() for k, v in state.items()}, str(d / R.MODEL_FILE))
        (d / R.SUMMARY_FILE).write_text(json.dumps(summary))
        out[name] = d
    return out


def evaluate(params, model_dir, data_root, teacher_dir, **kw):
    return R.evaluate_model(params, model_dir, data_root, teacher_dir, "cpu", figure_samples=N_FIG, progress=False, **kw)


@pytest.fixture(scope="module")
def cmapkd_runs(params, models, data_root, teacher_dir):
    """The random CMAPKD model evaluated twice (determinism)."""
    return [evaluate(params, models["cmapkd-s0"], data_root, teacher_dir) for _ in range(2)]


@pytest.fixture(scope="module")
def teacher_run(params, data_root, teacher_dir):
    return evaluate(params, teacher_dir, data_root, teacher_dir)


def check_metrics(m: dict, model: str, method: str, seed: int) -> None:
    assert list(m) == sorted(m) and set(m) == set(R.metric_keys(ZS))
    assert (m["model"], m["method"], m["seed"]) == (model, method, seed)
    for k in R.fraction_keys(ZS):
        assert isinstance(m[k], float) and 0.0 <= m[k] <= 1.0, k
    for k in ("params_image", "params_text", "params_total", "latency_threads"):
        assert isinstance(m[k], int) and m[k] > 0, k
    for k in ("flops_per_image", "flops_per_caption", "throughput_images_per_s") + R.TIMING_KEYS:
        assert isinstance(m[k], float) and math.isfinite(m[k]) and m[k] > 0, k
    assert m["device"] == "cpu" and m["vqa_probe_split"] == "test"
    # ordered retrieval recalls; the DualEncoder's logit scale is its only parameter outside the towers
    for d in ("i2t", "t2i"):
        assert m[f"retrieval_{d}_r1"] <= m[f"retrieval_{d}_r5"] <= m[f"retrieval_{d}_r10"]
    assert m["params_image"] + m["params_text"] + 1 == m["params_total"]
    json.loads(R.metrics_json(m))  # plain JSON, no NaN


def without_timing(m: dict) -> dict:
    return {k: v for k, v in m.items() if k not in R.TIMING_KEYS}


def test_cmapkd_metrics_complete_in_range_and_deterministic(cmapkd_runs):
    (m1, f1), (m2, f2) = cmapkd_runs
    check_metrics(m1, "cmapkd-s0", "cmapkd", 0)
    # only wall-clock keys may differ between two runs; the figure arrays are byte-identical
    assert R.metrics_json(without_timing(m1)) == R.metrics_json(without_timing(m2))
    assert R.figdata_bytes(f1) == R.figdata_bytes(f2)


def test_cmapkd_figdata_shapes_and_alsn(cmapkd_runs, params, models, data_root, teacher_dir):
    _, fig = cmapkd_runs[0]
    assert sorted(fig) == sorted(R.CMAPKD_FIGDATA_KEYS)
    n, C, E = N_FIG, params.model.pyramid_channels, 256
    idx = fig["sample_index"]
    assert idx.dtype == np.int64 and idx.shape == (n,) and np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(idx, R.figure_subset(10, N_FIG, params.evaluate.figure_seed))
    ds = ImageTextDataset(data_root, "test")
    assert fig["caption"].dtype.kind == "U" and list(fig["caption"]) == [ds.captions[i][0] for i in idx]
    assert list(fig["scene_type"]) == [ds.manifest[i]["scene_type"] for i in idx]
    assert list(fig["n_objects"]) == [len(ds.manifest[i]["objects"]) for i in idx]
    shapes = {"alsn_w_v": (n, 4), "alsn_w_l": (n, 4), "student_levels": (n, 4, C), "student_level_emb": (n, 4, E),
              "teacher_levels": (n, 4, E), "crossmodal_sim": (n, 4, 4), "crossmodal_sim_mean": (4, 4),
              "difficulty": (n,)}
    for k, shape in shapes.items():
        assert fig[k].shape == shape and fig[k].dtype == np.float32 and np.isfinite(fig[k]).all(), k
    for k in ("alsn_w_v", "alsn_w_l"):
        assert (fig[k] >= 0).all() and np.allclose(fig[k].sum(1), 1.0, atol=1e-5)
    assert (np.abs(fig["crossmodal_sim"]) <= 1 + 1e-5).all()
    np.testing.assert_allclose(fig["crossmodal_sim_mean"], fig["crossmodal_sim"].mean(0), atol=1e-6)
    assert ((fig["difficulty"] >= 0) & (fig["difficulty"] <= 1)).all()
    # the weights are the distiller's own alsn_weights on these samples
    loaded = R.load_model(params, models["cmapkd-s0"], teacher_dir)
    x = torch.from_numpy(np.asarray(ds.images[list(idx)])).permute(0, 3, 1, 2)
    ids, mask = loaded.distiller.student.tokenize(list(fig["caption"]))
    w_v, w_l = loaded.distiller.alsn_weights(x, ids, mask)
    np.testing.assert_allclose(fig["alsn_w_v"], w_v.numpy(), atol=1e-5)
    np.testing.assert_allclose(fig["alsn_w_l"], w_l.numpy(), atol=1e-5)


def test_figdata_npz_round_trip(cmapkd_runs, tmp_path):
    _, fig = cmapkd_runs[0]
    path = tmp_path / "fig.npz"
    R.save_figdata(path, fig)
    with np.load(path, allow_pickle=False) as z:
        assert sorted(z.files) == sorted(fig)
        for k in fig:
            assert z[k].shape == fig[k].shape and z[k].dtype == fig[k].dtype, k
            np.testing.assert_array_equal(z[k], fig[k])


def test_teacher_metrics_and_figdata(teacher_run, cmapkd_runs, teacher_dir):
    m, fig = teacher_run
    spec = json.loads((teacher_dir / "spec.json").read_text())
    check_metrics(m, teacher_dir.name, "teacher", spec["training"]["seed"])
    assert sorted(fig) == sorted(R.TEACHER_FIGDATA_KEYS)
    assert str(fig["teacher_sha256"]) == spec["identity"]["weights_sha256"]
    _, cm = cmapkd_runs[0]
    # the same subset and the same teacher arrays in the CMAPKD model's file
    for k in ("sample_index", "caption", "scene_type", "teacher_levels", "difficulty"):
        np.testing.assert_array_equal(fig[k], cm[k])
    assert fig["crossmodal_sim"].shape == (N_FIG, 4, 4)
    # the student is much smaller than the teacher
    assert m["params_total"] > cmapkd_runs[0][0]["params_total"]  # the student is the smaller model
    assert m["flops_per_image"] > cmapkd_runs[0][0]["flops_per_image"]


def test_cmapkd_reuses_the_teachers_figdata(teacher_run, cmapkd_runs, params, models, data_root, teacher_dir,
                                            tmp_path, monkeypatch):
    path = tmp_path / "teacher.npz"
    R.save_figdata(path, teacher_run[1])

    def no_teacher(*a, **k):
        raise AssertionError("the teacher must not run when its figure arrays can be reused")

    monkeypatch.setattr(R, "teacher_figure_arrays", no_teacher)
    m, fig = evaluate(params, models["cmapkd-s0"], data_root, teacher_dir, teacher_figdata=path)
    assert R.figdata_bytes(fig) == R.figdata_bytes(cmapkd_runs[0][1])
    assert without_timing(m) == without_timing(cmapkd_runs[0][0])


def test_cmapkd_without_figures_skips_the_arrays_and_the_teacher(cmapkd_runs, params, models, data_root,
                                                                  teacher_dir, monkeypatch):
    """Stage and ablation evaluations save no figure arrays, so they must not pay for them."""
    def no_figures(*a, **k):
        raise AssertionError("no figure arrays were asked for")

    monkeypatch.setattr(R, "teacher_figure_arrays", no_figures)
    monkeypatch.setattr(R, "cmapkd_figure_arrays", no_figures)
    m, fig = evaluate(params, models["cmapkd-s0"], data_root, teacher_dir, figures=False)
    assert fig is None
    assert without_timing(m) == without_timing(cmapkd_runs[0][0])


def test_scratch_model_has_metrics_but_no_figdata(params, models, data_root, teacher_dir, cmapkd_runs):
    m, fig = evaluate(params, models["scratch-s1"], data_root, teacher_dir)
    check_metrics(m, "scratch-s1", "scratch", 1)
    assert fig is None
    # the same student weights: the same embeddings, hence the same metrics as the CMAPKD folder's
    same = {k: v for k, v in without_timing(m).items() if k not in R.IDENTITY_KEYS}
    assert same == {k: v for k, v in without_timing(cmapkd_runs[0][0]).items() if k not in R.IDENTITY_KEYS}


def test_stage_writes_metrics_and_figdata(models, data_root, teacher_dir, tmp_path):
    from cmapkd.stages.evaluate import main

    out, fig = tmp_path / "metrics" / "scratch-s1.json", tmp_path / "figdata" / "scratch-s1.npz"
    fig.parent.mkdir()
    fig.write_bytes(b"stale")
    argv = ["--model", str(models["scratch-s1"]), "--data", str(data_root), "--teacher", str(teacher_dir),
            "--out", str(out), "--figdata", str(fig), "--params", str(ROOT / "params.yaml"), "--no-progress"]
    argv += [a for s in FAST for a in ("-S", s)]
    assert main(argv) == 0
    m = json.loads(out.read_text())
    check_metrics(m, "scratch-s1", "scratch", 1)
    assert not fig.exists()  # no figure arrays for a non-CMAPKD method, and no stale file left


def _stage_error(tmp_path, model_dir, data_root, teacher_dir, capsys) -> str:
    from cmapkd.stages.evaluate import main

    argv = ["--model", str(model_dir), "--data", str(data_root), "--teacher", str(teacher_dir),
            "--out", str(tmp_path / "m.json"), "--params", str(ROOT / "params.yaml"), "--no-progress"]
    assert main(argv) == 2
    assert not (tmp_path / "m.json").exists()
    return capsys.readouterr().err


def test_stage_errors_name_the_file(models, data_root, teacher_dir, tmp_path, capsys):
    missing = tmp_path / "nope"
    assert f"{missing}: model folder not found" in _stage_error(tmp_path, missing, data_root, teacher_dir, capsys)

    for name, (drop, what) in {"no-weights": (R.MODEL_FILE, "model weights not found"),
                               "no-summary": (R.SUMMARY_FILE, "run summary")}.items():
        d = tmp_path / name
        shutil.copytree(models["cmapkd-s0"], d)
        (d / drop).unlink()
        err = _stage_error(tmp_path, d, data_root, teacher_dir, capsys)
        assert f"{d / drop}: {what}" in err

    # a state dict that does not fit: a missing key (CMAPKD, strict) and a wrong shape (student only)
    d = tmp_path / "bad-cmapkd"
    shutil.copytree(models["cmapkd-s0"], d)
    sd = load_file(str(d / R.MODEL_FILE))
    sd.pop(next(k for k in sd if k.startswith("alsn.")))
    save_file(sd, str(d / R.MODEL_FILE))
    err = _stage_error(tmp_path, d, data_root, teacher_dir, capsys)
    assert f"{d / R.MODEL_FILE}: does not fit" in err and "alsn." in err

    d = tmp_path / "bad-scratch"
    shutil.copytree(models["scratch-s1"], d)
    sd = load_file(str(d / R.MODEL_FILE))
    k = next(k for k in sd if k.endswith("word_embeddings.weight"))
    sd[k] = sd[k][:10].contiguous()
    save_file(sd, str(d / R.MODEL_FILE))
    err = _stage_error(tmp_path, d, data_root, teacher_dir, capsys)
    assert f"{d / R.MODEL_FILE}: the 'student.*' entries do not fit" in err and "word_embeddings" in err

    d = tmp_path / "bad-summary"
    shutil.copytree(models["scratch-s1"], d)
    (d / R.SUMMARY_FILE).write_text('{"run": "mystery"}')
    assert f"{d / R.SUMMARY_FILE}: no 'method' key" in _stage_error(tmp_path, d, data_root, teacher_dir, capsys)


def test_figure_subset_is_fixed_and_sorted():
    a = R.figure_subset(500, 200, 0)
    assert len(a) == 200 and len(set(a.tolist())) == 200 and np.all(np.diff(a) > 0)
    np.testing.assert_array_equal(a, R.figure_subset(500, 200, 0))
    assert not np.array_equal(a, R.figure_subset(500, 200, 1))
    np.testing.assert_array_equal(R.figure_subset(7, 200, 0), np.arange(7))


def test_embed_texts_deduplicates_in_order(student):
    texts = ["a red apple", "two cats", "a red apple", "a rocket", "two cats"]
    got = R.embed_texts(student, texts, 2, torch.device("cpu"))
    ids, mask = student.tokenize(texts)
    with torch.no_grad():
        want = student.encode_text(ids, mask)
    assert got.shape == (5, want.shape[1])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert torch.equal(got[0], got[2]) and torch.equal(got[1], got[4])


@pytest.mark.skipif(not (REAL_DATA / "manifest-test.jsonl").is_file() or not (REAL_TEACHER / "spec.json").is_file(),
                    reason="needs the processed data and the trained teacher (dvc repro teacher)")
def test_trained_teacher_beats_a_random_student_on_the_real_test_split(student):
    from cmapkd.distill.teacher import load_teacher

    p = load_params(["model"], path=ROOT / "params.yaml")
    teacher = load_teacher(p.model, REAL_TEACHER)
    ds = ImageTextDataset(REAL_DATA, "test")
    n = 100  # the first 100 test images and their 500 captions keep this fast
    rows = list(range(n))
    t2i = [i for i in ds.text_to_image() if i < n]
    caps = ds.flat_captions()[: len(t2i)]
    scores = {}
    for name, model in (("teacher", teacher), ("student", student)):
        img = R.embed_images(model, ds.images, 50, torch.device("cpu"), rows)
        txt = R.embed_texts(model, caps, 100, torch.device("cpu"))
        scores[name] = R.retrieval_metrics(img, txt, t2i)
    assert scores["teacher"]["retrieval_mean"] > scores["student"]["retrieval_mean"] + 0.3
    assert scores["teacher"]["retrieval_i2t_r1"] > 0.3
