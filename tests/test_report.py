"""Tables 2-5 and Figures 3-6 (src/cmapkd/report) on synthetic metrics JSONs and figdata arrays,
and the paths that paper/main.tex reads from them."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from cmapkd.report import figures, tables
from cmapkd.report.tables import EFFICIENCY_KEYS, FRACTION_KEYS, ZEROSHOT_METRICS, ReportError

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# Synthetic inputs
# --------------------------------------------------------------------------------------------


def write_metrics(d: Path, model: str, seed: int, frac: float = 0.3, **over) -> Path:
    """One metrics JSON: every fraction = `frac`, efficiency values fixed, `over` on top."""
    m = {"model": model, "method": re.sub(r"-s\d+$", "", model), "seed": seed}
    m.update({k: frac for k in FRACTION_KEYS})
    m.update({f"zeroshot_{s}_{k}": frac for s in ("emoji_groups", "fashion_mnist") for k in ZEROSHOT_METRICS})
    m.update({k: 1.0 for k in EFFICIENCY_KEYS})
    m.update(params_total=5.0e6, latency_ms_image_b1=2.0, flops_per_image=3.0e8, device="cpu")
    m.update(over)
    d.mkdir(parents=True, exist_ok=True)
    p = d / f"{model}.json"
    p.write_text(json.dumps(m, indent=2), encoding="utf-8")
    return p


@pytest.fixture
def metrics_dir(tmp_path: Path) -> Path:
    d = tmp_path / "metrics"
    write_metrics(d, "teacher", 0, 0.9, params_total=2.0e7, latency_ms_image_b1=8.0)
    for s, r1 in enumerate((0.50, 0.52, 0.54)):  # mean 52.0, sample std 2.0 (percent)
        write_metrics(d, f"cmapkd-s{s}", s, 0.4, retrieval_i2t_r1=r1, latency_ms_image_b1=2.0 + s)
    for s, r1 in enumerate((0.30, 0.40)):  # mean 35.0, sample std sqrt(50) = 7.07
        write_metrics(d, f"scratch-s{s}", s, 0.3, retrieval_i2t_r1=r1)
    write_metrics(d, "promptkd-s0", 0, 0.35, retrieval_t2i_r1=0.60)  # best student on T2I R@1
    write_metrics(d, "c2kd-s0", 0, 0.33)
    write_metrics(d, "cmapkd-stage1-s0", 0, 0.2)
    write_metrics(d, "abl-p5only", 0, 0.25)
    return d


def md_row(text: str, name: str) -> list[str]:
    line = next(l for l in text.splitlines() if l.startswith(f"| {name} |"))
    return [c.strip() for c in line.strip("|").split("|")]


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def test_tables_mean_std_bold_teacher_adapted(metrics_dir: Path, tmp_path: Path):
    out = tmp_path / "tables"
    summary = tables.write_tables(metrics_dir, out)
    assert sorted(p.name for p in summary["files"]) == sorted(tables.TABLE_FILES)

    t2 = (out / "table2.md").read_text()
    # columns: Method, n, I2T R@1, R@5, R@10, T2I R@1, R@5, R@10, Mean
    cm = md_row(t2, "CMAPKD (ours)")
    assert cm[1] == "3" and cm[2] == "**52.0 ± 2.0**"  # hand-computed mean ± std (ddof=1), best: bold
    assert cm[3] == "**40.0 ± 0.0**"
    sc = md_row(t2, "Scratch")
    assert sc[1] == "2" and sc[2] == "35.0 ± 7.1"
    pk = md_row(t2, "PromptKD (adapted)")
    assert pk[1] == "1" and pk[5] == "**60.0**" and "±" not in pk[2]  # n = 1: no std
    assert md_row(t2, "CMAPKD (ours)")[5] == "40.0 ± 0.0"
    teacher = md_row(t2, "*Teacher (reference)*")
    assert teacher[2] == "90.0" and not any("**" in c for c in teacher)  # teacher best, never bold

    tex = (out / "table2.tex").read_text()
    assert r"\textbf{52.0 $\pm$ 2.0}" in tex and r"\begin{tabular}" in tex and r"\toprule" in tex
    lines = tex.splitlines()
    ti = next(i for i, l in enumerate(lines) if l.startswith(r"\textit{Teacher}"))
    assert r"\textbf" not in lines[ti] and lines[ti + 1] == r"\midrule"  # teacher block apart
    assert r"\caption{" in tex and r"\label{tab:retrieval}" in tex
    rows = list(csv.DictReader((out / "table2.csv").open()))
    cmr = next(r for r in rows if r["model"] == "cmapkd")
    assert cmr["i2t_r1_pct"] == "52.000000" and cmr["i2t_r1_pct_std"] == "2.000000" and cmr["seeds"] == "0 1 2"

    # adapted baselines are named as such in every table they appear in, in every format
    for n in (2, 3, 5):
        for ext in ("md", "tex", "csv"):
            text = (out / f"table{n}.{ext}").read_text()
            assert "PromptKD (adapted)" in text and "C2KD (adapted)" in text, (n, ext)
            assert not re.search(r"PromptKD(?! \(adapted\))", text.replace("PromptKD, C2KD", "")), (n, ext)

    # protocol in the captions
    assert "all captions of an image count" in t2 and "test split" in t2
    t3 = (out / "table3.md").read_text()
    assert "VQA is a probe, not zero-shot" in t3 and "Fashion-MNIST" in t3 and "EmojiScenes groups" in t3

    # Table 5: reduction and speed-up against the teacher; teacher row has none
    t5 = (out / "table5.md").read_text()
    cm5 = md_row(t5, "CMAPKD (ours)")
    assert cm5[-2] == "75.0" and cm5[-1] == "2.67×"  # 1 - 5M/20M; 8 ms / mean(2, 3, 4) ms
    assert md_row(t5, "*Teacher (reference)*")[-2:] == ["–", "–"]
    assert md_row(t5, "Scratch")[2] == "5.00"  # params (M): all students tie -> no bold
    assert "**5.00**" not in t5

    # Table 4: the full method, the progressive stage and the ablation that exist
    t4 = (out / "table4.md").read_text()
    assert md_row(t4, "CMAPKD (ours)")[1] == "3"
    assert md_row(t4, "CMAPKD after stage 1 (P5 / L4)")[1] == "1"
    assert md_row(t4, "w/o visual pyramid (P5 only)")[1] == "1"
    assert "w/o ALSN (uniform weights)" not in t4  # missing model: no row


def test_tables_missing_models(tmp_path: Path):
    d = tmp_path / "metrics"
    write_metrics(d, "cmapkd-s0", 0, 0.4)  # quick profile: one seed, no teacher, no baselines
    write_metrics(d, "mystery-s0", 0, 0.4)  # unknown group: ignored
    out = tmp_path / "tables"
    summary = tables.write_tables(d, out)
    assert summary["ignored"] == ["mystery"]
    assert summary["rows"][2] == [("cmapkd", 1)] and summary["rows"][4] == [("cmapkd", 1)]
    t5 = (out / "table5.md").read_text()
    assert md_row(t5, "CMAPKD (ours)")[-2:] == ["–", "–"]  # no teacher: no reduction/speed-up
    assert "Teacher" not in "".join(l for l in t5.splitlines() if l.startswith("|"))

    only_teacher = tmp_path / "m2"
    write_metrics(only_teacher, "teacher", 0, 0.9)
    tables.write_tables(only_teacher, tmp_path / "t2")
    t4 = (tmp_path / "t2" / "table4.md").read_text()
    assert "(no metrics of CMAPKD, its stages or its ablations)" in t4
    assert "no metrics of CMAPKD" in (tmp_path / "t2" / "table4.tex").read_text()


def test_tables_bad_inputs_name_the_file(tmp_path: Path):
    d = tmp_path / "metrics"
    write_metrics(d, "teacher", 0)
    bad = d / "kd-s0.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ReportError, match=r"kd-s0\.json: not valid JSON"):
        tables.load_runs(d)

    p = write_metrics(d, "kd-s0", 0)
    m = json.loads(p.read_text())
    del m["retrieval_mean"]
    p.write_text(json.dumps(m))
    with pytest.raises(ReportError, match=r"kd-s0\.json: missing key\(s\) retrieval_mean"):
        tables.load_runs(d)

    write_metrics(d, "kd-s0", 0, retrieval_mean=52.0)  # a percentage where a fraction belongs
    with pytest.raises(ReportError, match=r"kd-s0\.json: key 'retrieval_mean' = 52.0 is not a fraction"):
        tables.load_runs(d)

    write_metrics(d, "kd-s0", 1)  # id says seed 0
    with pytest.raises(ReportError, match=r"kd-s0\.json: model id 'kd-s0' names seed 0"):
        tables.load_runs(d)

    p = write_metrics(d, "kd-s0", 0)
    m = json.loads(p.read_text())
    del m["zeroshot_fashion_mnist_top5"]  # the teacher's file has this zero-shot set
    p.write_text(json.dumps(m))
    with pytest.raises(ReportError, match=r"kd-s0\.json: missing key\(s\) zeroshot_fashion_mnist_top5"):
        tables.load_runs(d)

    write_metrics(d, "kd-s0", 0)
    with pytest.raises(ReportError, match="report.headline_metric"):
        tables.build_tables(tables.load_runs(d), headline_metric="params_total")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="no metrics JSON"):
        tables.load_runs(tmp_path / "empty")


def test_tables_stage_byte_identical(metrics_dir: Path, tmp_path: Path):
    from cmapkd.stages.tables import main

    for name in ("a", "b"):
        assert main(["--params", str(ROOT / "params.yaml"), "--metrics", str(metrics_dir), "--out", str(tmp_path / name)]) == 0
    for f in tables.TABLE_FILES:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert main(["--params", str(ROOT / "params.yaml"), "--metrics", str(tmp_path / "nope"), "--out", str(tmp_path / "c")]) == 2


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def write_figdata(path: Path, n_per_type: int = 10, c: int = 12, e: int = 20, seed: int = 0, **over) -> Path:
    rng = np.random.default_rng(seed)
    types = np.repeat(np.array(figures.SCENE_TYPES), n_per_type)
    n = len(types)

    def simplex(k: int) -> np.ndarray:
        z = np.exp(rng.normal(0, 0.6, (k, 4)))
        return (z / z.sum(1, keepdims=True)).astype(np.float32)

    arrays = dict(
        sample_index=np.arange(n) * 3,
        scene_type=types,
        caption=np.array([f"A {t} scene \U0001F992 with caption number {i} and $dollars$" for i, t in enumerate(types)]),
        difficulty=rng.random(n),
        alsn_w_v=simplex(n),
        alsn_w_l=simplex(n),
        student_levels=rng.normal(size=(n, 4, c)).astype(np.float32) + np.arange(4)[None, :, None],
        teacher_levels=rng.normal(size=(n, 4, e)).astype(np.float32) + np.arange(4)[None, :, None],
        crossmodal_sim=np.clip(rng.normal(0.1, 0.3, (n, 4, 4)), -1, 1).astype(np.float32),
    )
    arrays.update(over)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def test_figures_byte_identical_and_no_dates(tmp_path: Path):
    fd = figures.load_figdata(write_figdata(tmp_path / "figdata" / "cmapkd-s0.npz"))
    rng = np.random.default_rng(1)
    images = {int(i): rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for i in fd.sample_index}
    kw = dict(images=images, fig3_samples=20, tsne_samples=16, tsne_pca_dim=8, tsne_perplexity=30.0, tsne_seed=0)
    a = figures.write_figures(fd, tmp_path / "a", **kw)
    b = figures.write_figures(fd, tmp_path / "b", **kw)
    assert sorted(p.name for p in a) == sorted(figures.FIGURE_FILES)
    for pa, pb in zip(a, b):
        assert pa.read_bytes() == pb.read_bytes(), pa.name
    for p in a:
        data = p.read_bytes()
        assert b"CreationDate" not in data and b"ModDate" not in data and b"matplotlib" not in data.lower(), p.name
        assert data[:4] in (b"\x89PNG", b"%PDF")


def test_figure_selection_and_text():
    fd = figures.FigData(
        path=Path("x.npz"),
        sample_index=np.array([5, 3, 9, 1]),
        scene_type=np.array(["simple", "simple", "complex", "abstract"]),
        caption=np.array(["a", "b", "c", "d"]),
        difficulty=np.array([0.5, 0.1, 0.9, 0.5]),
        alsn_w_v=np.array([[0.7, 0.1, 0.1, 0.1], [0.25] * 4, [0.25] * 4, [0.25] * 4]),
        alsn_w_l=np.full((4, 4), 0.25),
        student_levels=np.zeros((4, 4, 2)),
        teacher_levels=np.zeros((4, 4, 2)),
        crossmodal_sim=np.zeros((4, 4, 4)),
    )
    assert figures.difficulty_order(fd).tolist() == [1, 3, 0, 2]  # tie 0.5: sample 1 before 5
    assert figures.select_by_difficulty(fd, 2).tolist() == [1, 2]  # first and last
    reps = figures.representatives(fd)
    assert reps["fine-grained"] is None and reps["complex"] == 2 and reps["abstract"] == 3
    assert reps["simple"] == 1  # a tie in distance to the mean: the lower sample index
    assert figures.median_difficulty_row(fd) == 3
    no_types = figures.FigData(**{**fd.__dict__, "scene_type": np.array([""] * 4)})  # e.g. COCO
    assert figures.representatives(no_types) == dict(zip(figures.QUARTERS, [1, 3, 0, 2]))
    text = figures.plain_text("giraffe \U0001F992\u200d\ufe0f  emoji   face")  # DejaVu Sans has no giraffe
    assert text == "giraffe \u25a1 emoji face"


def test_figdata_errors_name_file_and_key(tmp_path: Path):
    p = write_figdata(tmp_path / "bad.npz")
    with np.load(p) as z:
        arrays = {k: z[k] for k in z.files}
    del arrays["crossmodal_sim"]
    np.savez(p, **arrays)
    with pytest.raises(ReportError, match=r"bad\.npz: missing key\(s\) crossmodal_sim"):
        figures.load_figdata(p)
    p2 = write_figdata(tmp_path / "shape.npz", alsn_w_v=np.full((40, 3), 1 / 3))
    with pytest.raises(ReportError, match=r"shape\.npz: key 'alsn_w_v' has shape \[40, 3\], expected \[40, 4\]"):
        figures.load_figdata(p2)
    p3 = write_figdata(tmp_path / "types.npz", scene_type=np.array(["weird"] * 40))
    with pytest.raises(ReportError, match=r"types\.npz: key 'scene_type' has unknown value"):
        figures.load_figdata(p3)


def test_ranks_errors_name_file_and_problem(tmp_path: Path):
    from cmapkd.report.stats import RanksError, read_ranks

    good = tmp_path / "good.npz"
    np.savez(good, i2t_rank=np.array([0, 3]), t2i_rank=np.array([1, 0, 12]), text_to_image=np.array([0, 0, 1]))
    r = read_ranks(good)
    assert r.i2t.tolist() == [0, 3] and r.t2i.tolist() == [1, 0, 12] and r.t2i.dtype == np.int64
    with pytest.raises(RanksError, match=r"absent\.npz: per-query ranks .* not found"):
        read_ranks(tmp_path / "absent.npz")
    np.savez(tmp_path / "nokey.npz", i2t_rank=np.array([0]), t2i_rank=np.array([0]))
    with pytest.raises(RanksError, match=r"nokey\.npz: missing key\(s\) text_to_image"):
        read_ranks(tmp_path / "nokey.npz")
    np.savez(tmp_path / "obj.npz", i2t_rank=np.array([0]), t2i_rank=np.array([{}], dtype=object), text_to_image=np.array([0]))
    with pytest.raises(RanksError, match=r"obj\.npz: key 't2i_rank' cannot be read without pickle"):
        read_ranks(tmp_path / "obj.npz")
    (tmp_path / "text.npz").write_text("not an npz")
    with pytest.raises(RanksError, match=r"text\.npz: not a readable \.npz file"):
        read_ranks(tmp_path / "text.npz")
    np.savez(tmp_path / "len.npz", i2t_rank=np.array([0]), t2i_rank=np.array([0, 1]), text_to_image=np.array([0]))
    with pytest.raises(RanksError, match=r"len\.npz: t2i_rank has"):
        read_ranks(tmp_path / "len.npz")


def test_figures_stage_missing_figdata(tmp_path: Path, capsys):
    from cmapkd.stages.figures import main

    write_figdata(tmp_path / "figdata" / "cmapkd-s1.npz", n_per_type=1)
    rc = main(["--params", str(ROOT / "params.yaml"), "--figdata", str(tmp_path / "figdata"), "--out", str(tmp_path / "f")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "cmapkd-s0.npz" in err and "found: cmapkd-s1" in err


# --------------------------------------------------------------------------------------------
# Paper
# --------------------------------------------------------------------------------------------


def test_paper_paths():
    """Every \\input / \\includegraphics of paper/main.tex is a file the tables or figures stage
    writes (and exists, once those stages have run), or one of the sweep's files, which the paper
    includes only when they exist (\\IfFileExists: scripts/sweep.sh is not part of `dvc repro`)."""
    tex = (ROOT / "paper" / "main.tex").read_text(encoding="utf-8")
    tex = "\n".join(line.split("%")[0] for line in tex.splitlines())  # drop comments
    refs = re.findall(r"\\(input|includegraphics)(?:\[[^\]]*\])?\{([^}]+)\}", tex)
    assert refs, "paper/main.tex includes no generated table or figure"
    outputs = {Path("reports/tables") / f for f in tables.TABLE_FILES} | {
        Path("reports/figures") / f for f in figures.FIGURE_FILES
    }
    sweep_files = {Path("reports/sweep/sweep.tex"), Path("reports/sweep/sweep.pdf")}
    guarded = set(re.findall(r"\\IfFileExists\{([^}]+)\}", tex))
    assert {str(Path("..") / f) for f in sweep_files} <= guarded, "the sweep's files are included only if they exist"
    seen = {"input": set(), "includegraphics": set()}
    for kind, ref in refs:
        rel = Path(ref)
        path = Path(*(ROOT / "paper" / rel).resolve().relative_to(ROOT).parts)
        if path in sweep_files:
            continue
        assert path in outputs, f"{ref}: not an output of the tables or figures stage"
        assert (kind == "input") == (path.suffix == ".tex"), ref
        seen[kind].add(path.name)
        if (ROOT / path.parent).is_dir():  # the stage has run here: the file must exist
            assert (ROOT / path).is_file(), f"{ref}: {path} is missing (run `dvc repro tables figures`)"
    assert seen["input"] == {f"table{i}.tex" for i in tables.TABLE_IDS}
    assert seen["includegraphics"] == {f"{s}.pdf" for s in figures.FIGURE_STEMS}


def test_metrics_of_seeds_outside_params_are_left_out(metrics_dir: Path, tmp_path: Path):
    """Metrics files of an earlier, longer `seeds` list stay in the folder; the tables use only
    the current seeds (and every unseeded model, such as the teacher)."""
    out = tmp_path / "tables-seeds"
    summary = tables.write_tables(metrics_dir, out, seeds=[0, 2])
    table2 = (out / "table2.md").read_text(encoding="utf-8")
    row = next(line for line in table2.splitlines() if line.startswith("| CMAPKD"))
    assert row.split("|")[2].strip() == "2"  # n = 2 of the 3 seeds on disk
    assert "52.0" in row  # mean of R@1 0.50 (seed 0) and 0.54 (seed 2)
    assert any(line.startswith("| *Teacher") for line in table2.splitlines())
    assert summary["files"]


def test_left_out_files_may_have_other_zeroshot_sets(metrics_dir: Path, tmp_path: Path):
    """A run with other zero-shot sets (e.g. the paper setting's [imagenet]) next to an earlier
    run's seed-2 file: the file the params leave out is not held against the others; a kept one is."""
    stale = json.loads((metrics_dir / "cmapkd-s2.json").read_text())
    for k in list(stale):
        if k.startswith("zeroshot_fashion_mnist_"):
            del stale[k]
    (metrics_dir / "cmapkd-s2.json").write_text(json.dumps(stale))
    summary = tables.write_tables(metrics_dir, tmp_path / "t", seeds=[0, 1])
    assert summary["files"]
    with pytest.raises(ReportError, match=r"cmapkd-s2\.json: missing key\(s\) zeroshot_fashion_mnist_top1"):
        tables.write_tables(metrics_dir, tmp_path / "t2", seeds=[0, 1, 2])


def test_imagenet_caption_names_the_templates_used(tmp_path: Path):
    d = tmp_path / "metrics"
    imagenet = {f"zeroshot_imagenet_{m}": 0.1 for m in ZEROSHOT_METRICS}
    for model, seed in (("teacher", 0), ("scratch-s0", 0), ("cmapkd-s0", 0)):
        p = write_metrics(d, model, seed, **imagenet)
        m = {k: v for k, v in json.loads(p.read_text()).items() if not k.startswith(("zeroshot_emoji", "zeroshot_fashion"))}
        p.write_text(json.dumps(m))
    tables.write_tables(d, tmp_path / "simple", dataset="coco_karpathy", imagenet_templates="simple")
    tables.write_tables(d, tmp_path / "openai", dataset="coco_karpathy")
    assert "ImageNet-1k: the validation set, open_clip's 7 simple prompt templates" in (tmp_path / "simple" / "table3.md").read_text()
    assert "ImageNet-1k: the validation set, CLIP's 80 prompt templates" in (tmp_path / "openai" / "table3.md").read_text()


def test_metrics_of_ablations_outside_params_are_left_out(metrics_dir: Path, tmp_path: Path):
    """A quick profile (`-S ablation_runs=[...]`) must not show ablations of an earlier full run."""
    kept = tables.write_tables(metrics_dir, tmp_path / "with", ablations=["p5only"])
    dropped = tables.write_tables(metrics_dir, tmp_path / "without", ablations=["onestage"])
    assert "(P5 only)" in (tmp_path / "with" / "table4.md").read_text(encoding="utf-8")
    assert "(P5 only)" not in (tmp_path / "without" / "table4.md").read_text(encoding="utf-8")
    assert kept["files"] and dropped["files"]


def test_metrics_of_stages_outside_params_are_left_out(metrics_dir: Path, tmp_path: Path):
    """`-S stage_evals=[stage3]` must not show the stage-1 row of an earlier full run."""
    tables.write_tables(metrics_dir, tmp_path / "with", stages=["stage1"])
    tables.write_tables(metrics_dir, tmp_path / "without", stages=["stage3"])
    assert "after stage 1" in (tmp_path / "with" / "table4.md").read_text(encoding="utf-8")
    assert "after stage 1" not in (tmp_path / "without" / "table4.md").read_text(encoding="utf-8")


def _write_ranks(d: Path, model: str, i2t: list[int], t2i: list[int]) -> None:
    from cmapkd.eval.run import save_figdata

    d.mkdir(parents=True, exist_ok=True)
    save_figdata(d / f"{model}.npz", {"i2t_rank": np.array(i2t, dtype=np.int32), "t2i_rank": np.array(t2i, dtype=np.int32),
                                      "text_to_image": np.repeat(np.arange(len(i2t)), 2).astype(np.int32)})


def test_table2_delta_vs_scratch_and_reference_rows(metrics_dir: Path, tmp_path: Path):
    """Table 2's paired difference to Scratch (seeds pooled, bootstrap interval) and the init /
    random-weight reference rows (Table 3 only for random), never bold."""
    ranks = tmp_path / "ranks"
    n = 40
    for s in (0, 1):  # scratch: no query within 10
        _write_ranks(ranks, f"scratch-s{s}", [50] * n, [50] * (2 * n))
    for s in (0, 1, 2):  # cmapkd: every query a hit at 1 -> +100 points, interval [100, 100]
        _write_ranks(ranks, f"cmapkd-s{s}", [0] * n, [0] * (2 * n))
    _write_ranks(ranks, "promptkd-s0", [0] * (n // 2) + [50] * (n // 2), [50] * (2 * n))  # i2t half: +25 points
    _write_ranks(ranks, "c2kd-s0", [50] * n, [50] * (2 * n))
    write_metrics(metrics_dir, "student_init", 0, 0.31, method="init")
    write_metrics(metrics_dir, "random", 0, 0.99)  # a reference is never bold, even when highest
    out = tmp_path / "tables"
    summary = tables.write_tables(metrics_dir, out, ranks_dir=ranks)
    assert summary["deltas"]["cmapkd"].diff == pytest.approx(1.0)
    t2 = (out / "table2.md").read_text()
    assert md_row(t2, "CMAPKD (ours)")[-1] == "+100.0 [+100.0, +100.0]"
    pk = md_row(t2, "PromptKD (adapted)")[-1]
    assert pk.startswith("+25.0 [") and float(pk.split("[")[1].split(",")[0]) < 25.0
    assert md_row(t2, "C2KD (adapted)")[-1] == "0.0 [0.0, 0.0]"
    assert md_row(t2, "Scratch")[-1] == "–"
    init = md_row(t2, "*Student at start (pretrained towers, aligned heads; no training) (reference)*")
    assert init[2] == "31.0" and "Student with random weights" not in t2
    t3 = (out / "table3.md").read_text()
    rnd = md_row(t3, "*Student with random weights (reference)*")
    assert rnd[-1] == "99.0" and not any("**" in c for c in rnd)
    rows = list(csv.DictReader((out / "table2.csv").open()))
    cm = next(r for r in rows if r["model"] == "cmapkd")
    assert float(cm["delta_mean"]) == 100.0 and float(cm["delta_mean_ci_lo"]) == 100.0
    (ranks / "c2kd-s0.npz").unlink()
    with pytest.raises(ReportError, match="c2kd-s0.npz"):
        tables.write_tables(metrics_dir, out, ranks_dir=ranks)


def test_metrics_of_baselines_not_in_params_are_left_out(metrics_dir: Path, tmp_path: Path):
    """A quick profile (fewer baselines.methods) must not mix in the committed files of other baselines."""
    out = tmp_path / "tables"
    summary = tables.write_tables(metrics_dir, out, methods=["scratch"])
    groups = {g for g, _ in summary["rows"][2]}
    assert "scratch" in groups and "cmapkd" in groups and not groups & {"promptkd", "c2kd"}


def test_tables_6_7_by_scene_type_and_object_size(metrics_dir: Path, tmp_path: Path):
    """Retrieval per scene type / smallest-object size from the per-query ranks and the test
    manifest (Table 6, mean +- std over seeds) and CMAPKD's paired differences there (Table 7);
    data without scene types (the paper's) gets both tables empty with the reason, not numbers."""
    types = ["simple", "simple", "complex", "complex", "fine-grained", "fine-grained", "abstract", "abstract"]
    sizes = ["small"] * 4 + ["large"] * 4
    data = tmp_path / "data"
    data.mkdir()
    (data / "manifest-test.jsonl").write_text("".join(
        json.dumps({"index": i, "scene_type": t, "objects": [{"size": s}, {"size": "large"}]}) + "\n"
        for i, (t, s) in enumerate(zip(types, sizes))))
    ranks = tmp_path / "ranks"
    hit_simple = [0, 0] + [50] * 6  # only the two simple scenes are found (with both their captions)
    for model in ("teacher", "abl-p5only"):
        _write_ranks(ranks, model, [0] * 8, [0] * 16)
    for s in (0, 1, 2):
        _write_ranks(ranks, f"cmapkd-s{s}", hit_simple, list(np.repeat(hit_simple, 2)))
    for model in ("scratch-s0", "scratch-s1", "promptkd-s0", "c2kd-s0"):
        _write_ranks(ranks, model, [50] * 8, [50] * 16)
    out = tmp_path / "tables"
    tables.write_tables(metrics_dir, out, ranks_dir=ranks, test_manifest=data / "manifest-test.jsonl")
    t6 = (out / "table6.md").read_text()
    assert "All (8)" in t6 and "Scene type Simple (2)" in t6 and "Smallest object Small (4)" in t6
    assert "Medium" not in t6  # no scene has a medium smallest object: no empty column
    assert md_row(t6, "CMAPKD (ours)")[1:5] == ["3", "25.0 ± 0.0", "**100.0 ± 0.0**", "0.0 ± 0.0"]  # ties w/o pyramid
    assert md_row(t6, "CMAPKD (ours)")[-2:] == ["50.0 ± 0.0", "0.0 ± 0.0"]  # smallest small, large
    assert md_row(t6, "PromptKD (adapted) (best baseline)")[2] == "0.0"  # Table 2's best of the baselines
    assert md_row(t6, "*Teacher (reference)*")[2] == "100.0"
    t7 = (out / "table7.md").read_text()
    vs_scratch = md_row(t7, "CMAPKD (ours) - Scratch")
    assert vs_scratch[2].startswith("+25.0 [") and vs_scratch[3] == "+100.0 [+100.0, +100.0]"
    assert md_row(t7, "CMAPKD (ours) - w/o visual pyramid (P5 only)")[4] == "-100.0 [-100.0, -100.0]"

    paper = tmp_path / "paper"
    paper.mkdir()
    (paper / "manifest-test.jsonl").write_text(json.dumps({"index": 0, "captions": ["a cat"]}) + "\n")
    tables.write_tables(metrics_dir, tmp_path / "paper-tables", ranks_dir=ranks, dataset="coco_karpathy",
                        test_manifest=paper / "manifest-test.jsonl")
    for n in (6, 7):
        text = (tmp_path / "paper-tables" / f"table{n}.md").read_text()
        assert "has no scene types or object sizes: the breakdown is skipped" in text
