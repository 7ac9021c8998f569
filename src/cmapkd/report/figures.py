"""Figures 3-6 of the paper (METHOD.md section 7) from the arrays the evaluate stage saved.

Input: `reports/figdata/<model_id>.npz` of a CMAPKD student (`FIGDATA_KEYS`, docs/reports.md) and,
for Figure 4, the test images of the processed dataset. Output: `FIGURE_FILES` (PNG and PDF).

- Figure 3: ALSN level weights (visual P2..P5, language L1..L4) of up to `fig3_samples` test
  samples sorted by difficulty, easy -> hard (evenly spaced in difficulty order when there are more).
- Figure 4: radar charts of both weight vectors for one representative sample per scene type
  (simple, complex, fine-grained, abstract): the sample of that type whose weights are nearest the
  type's mean weights, shown with its image and caption (data without scene types: the middle
  sample of each quarter of the difficulty order).
- Figure 5: t-SNE of the pooled P2..P5 features of the teacher and the student, coloured by level,
  marker by model. The two sides have different widths and unrelated bases, so each side's
  L2-normalised level vectors are PCA-projected to a common width (`tsne_pca_dim`, capped by the
  data), the student's projection is rotated onto the teacher's by orthogonal Procrustes over the
  paired (sample, level) points (a rotation: it changes no distance within the student), both are
  scaled to unit RMS norm, and one t-SNE (`tsne_seed`) embeds them together.
- Figure 6: the 4x4 cross-modal cosine similarity P2..P5 x L1..L4, for the test sample of median
  difficulty and averaged over all samples, on the fixed scale [-1, 1] with the diagonal outlined.

Determinism: no pyplot state (a `Figure` per plot), fixed rcParams, fixed seeds, single-threaded
PCA/t-SNE, and no dates or versions in the file metadata: a rerun writes identical bytes.
"""

from __future__ import annotations

import math
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from cmapkd.report.npz import read_npz
from cmapkd.report.tables import ReportError

SCENE_TYPES = ("simple", "complex", "fine-grained", "abstract")
VIS_LEVELS = ("P2", "P3", "P4", "P5")
TXT_LEVELS = ("L1", "L2", "L3", "L4")
FIGURE_STEMS = ("fig3_alsn_weights", "fig4_alsn_radar", "fig5_tsne_levels", "fig6_crossmodal_sim")
FIGURE_FILES = tuple(f"{s}.{ext}" for s in FIGURE_STEMS for ext in ("png", "pdf"))
FIGDATA_KEYS = (
    "sample_index", "scene_type", "caption", "difficulty", "alsn_w_v", "alsn_w_l",
    "student_levels", "teacher_levels", "crossmodal_sim",
)
# one colour per level, fine (P2/L1) -> coarse (P5/L4); Paul Tol's colour-blind-safe "bright"
LEVEL_COLORS = ("#4477AA", "#66CCEE", "#CCBB44", "#EE6677")
PNG_DPI = 200
RC = {
    "font.family": "DejaVu Sans",  # ships with matplotlib: the same glyphs on every machine
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "svg.hashsalt": "cmapkd",
    "pdf.fonttype": 42,
    "pdf.compression": 6,
    "text.usetex": False,
    "savefig.dpi": PNG_DPI,
    "image.interpolation": "nearest",
}
PNG_METADATA = {"Software": None}
PDF_METADATA = {"Creator": None, "Producer": None, "CreationDate": None, "ModDate": None}


@dataclass(frozen=True)
class FigData:
    """The arrays of one `reports/figdata/<model_id>.npz` (N test samples)."""

    path: Path
    sample_index: np.ndarray  # [N] int
    scene_type: np.ndarray  # [N] str
    caption: np.ndarray  # [N] str
    difficulty: np.ndarray  # [N] float, higher = harder
    alsn_w_v: np.ndarray  # [N, 4] P2..P5, rows sum to 1
    alsn_w_l: np.ndarray  # [N, 4] L1..L4
    student_levels: np.ndarray  # [N, 4, C]
    teacher_levels: np.ndarray  # [N, 4, E]
    crossmodal_sim: np.ndarray  # [N, 4, 4] P_i x L_j cosine

    @property
    def n(self) -> int:
        return len(self.sample_index)

    @property
    def model(self) -> str:
        return self.path.stem


def load_figdata(path: str | Path) -> FigData:
    """Read and check one figdata npz; a `ReportError` names the file and the key."""
    path = Path(path)
    arrays = read_npz(path, FIGDATA_KEYS, ReportError, "figdata file (the evaluate stage writes it)")
    n = arrays["sample_index"].shape[0] if arrays["sample_index"].ndim == 1 else -1
    if n < 1:
        raise ReportError(f"{path}: key 'sample_index' must be a non-empty 1-d array, got shape {arrays['sample_index'].shape}")

    def check(key: str, ndim: int, shape_tail: tuple | None = None, kind: str = "f") -> np.ndarray:
        a = arrays[key]
        if a.ndim != ndim or a.shape[0] != n or (shape_tail is not None and a.shape[1:] != shape_tail):
            want = f"[{n}" + "".join(f", {d}" for d in (shape_tail or ())) + ("]" if shape_tail is not None or ndim == 1 else ", ...]")
            raise ReportError(f"{path}: key '{key}' has shape {list(a.shape)}, expected {want}")
        if kind == "U" and a.dtype.kind != "U":
            raise ReportError(f"{path}: key '{key}' must be a string array, got dtype {a.dtype}")
        if kind == "i" and a.dtype.kind not in "iu":
            raise ReportError(f"{path}: key '{key}' must be an integer array, got dtype {a.dtype}")
        if kind == "f":
            if a.dtype.kind not in "fiu":
                raise ReportError(f"{path}: key '{key}' must be numeric, got dtype {a.dtype}")
            a = a.astype(np.float64)
            if not np.isfinite(a).all():
                raise ReportError(f"{path}: key '{key}' has non-finite values")
        return a

    sample_index = check("sample_index", 1, kind="i").astype(np.int64)
    scene_type = check("scene_type", 1, kind="U")
    bad = sorted(set(scene_type.tolist()) - set(SCENE_TYPES) - {""})
    if bad:
        raise ReportError(f"{path}: key 'scene_type' has unknown value(s) {bad}; expected {list(SCENE_TYPES)} or ''")
    caption = check("caption", 1, kind="U")
    difficulty = check("difficulty", 1)
    w_v = check("alsn_w_v", 2, (4,))
    w_l = check("alsn_w_l", 2, (4,))
    for key, w in (("alsn_w_v", w_v), ("alsn_w_l", w_l)):
        if (w < -1e-6).any() or not np.allclose(w.sum(1), 1.0, atol=1e-3):
            raise ReportError(f"{path}: key '{key}' rows must be non-negative and sum to 1")
    s_lv = check("student_levels", 3)
    t_lv = check("teacher_levels", 3)
    for key, a in (("student_levels", s_lv), ("teacher_levels", t_lv)):
        if a.shape[1] != 4:
            raise ReportError(f"{path}: key '{key}' has shape {list(a.shape)}, expected [{n}, 4, width]")
    sim = check("crossmodal_sim", 3, (4, 4))
    if len(np.unique(sample_index)) != n:
        raise ReportError(f"{path}: key 'sample_index' has repeated values")
    return FigData(path, sample_index, scene_type, caption, difficulty, w_v, w_l, s_lv, t_lv, sim)


# --------------------------------------------------------------------------------------------
# Sample selection (deterministic: ties broken by sample index)
# --------------------------------------------------------------------------------------------


def difficulty_order(fd: FigData) -> np.ndarray:
    """Row indices sorted by difficulty (easy -> hard), ties by sample index."""
    return np.lexsort((fd.sample_index, fd.difficulty))


def select_by_difficulty(fd: FigData, n: int) -> np.ndarray:
    """Up to n rows evenly spaced along the difficulty order (all rows when there are fewer)."""
    order = difficulty_order(fd)
    if n >= len(order):
        return order
    return order[np.round(np.linspace(0, len(order) - 1, n)).astype(int)]


QUARTERS = ("easiest quarter", "second quarter", "third quarter", "hardest quarter")


def representatives(fd: FigData) -> dict[str, int | None]:
    """Per scene type, the row whose [w_v; w_l] is nearest that type's mean (None if no sample).
    Data without scene types ('' everywhere, e.g. COCO): the middle sample of each quarter of the
    difficulty order instead, keyed by `QUARTERS`."""
    if not any((fd.scene_type == t).any() for t in SCENE_TYPES):
        order = difficulty_order(fd)
        return {q: int(order[min(len(order) - 1, (2 * k + 1) * len(order) // 8)]) for k, q in enumerate(QUARTERS)}
    w = np.concatenate([fd.alsn_w_v, fd.alsn_w_l], axis=1)
    out: dict[str, int | None] = {}
    for t in SCENE_TYPES:
        rows = np.flatnonzero(fd.scene_type == t)
        if len(rows) == 0:
            out[t] = None
            continue
        rows = rows[np.argsort(fd.sample_index[rows], kind="stable")]
        d = np.round(np.linalg.norm(w[rows] - w[rows].mean(0), axis=1), 9)  # near-ties: lower sample index
        out[t] = int(rows[int(np.argmin(d))])
    return out


def median_difficulty_row(fd: FigData) -> int:
    order = difficulty_order(fd)
    return int(order[(len(order) - 1) // 2])


# --------------------------------------------------------------------------------------------
# Text that the bundled font can draw
# --------------------------------------------------------------------------------------------

_CHARMAP: set[int] | None = None


def plain_text(text: str) -> str:
    """`text` with every character DejaVu Sans lacks (emoji, variation selectors, ZWJ) replaced:
    invisible joiners/selectors are dropped, other missing glyphs become a white square."""
    global _CHARMAP
    if _CHARMAP is None:
        from matplotlib import font_manager
        from matplotlib.ft2font import FT2Font

        font = FT2Font(font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans"), fallback_to_default=False))
        _CHARMAP = set(font.get_charmap())
    out = []
    for ch in text:
        cp = ord(ch)
        if cp in (0x200D, 0x20E3) or 0xFE00 <= cp <= 0xFE0F or 0x1F3FB <= cp <= 0x1F3FF or 0xE0020 <= cp <= 0xE007F:
            continue
        out.append(ch if (cp in _CHARMAP or ch in "\n ") else "\u25a1")
    return " ".join("".join(out).split())


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _new_figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), layout="constrained")


def _stacked(ax, weights: np.ndarray, labels: tuple[str, ...]) -> None:
    x = np.arange(len(weights))
    bottom = np.zeros(len(weights))
    for k in range(4):
        ax.bar(x, weights[:, k], bottom=bottom, width=1.0, color=LEVEL_COLORS[k], label=labels[k], linewidth=0)
        bottom += weights[:, k]
    ax.set_ylim(0, 1)
    ax.set_xlim(-0.5, len(weights) - 0.5)
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    # legend top-down in the order the bars stack bottom-up
    handles, lab = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], lab[::-1], loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, title="level")


def weight_spread(fd: FigData) -> str:
    """Std over the figure's samples of each level weight: does the ALSN weight samples differently?"""
    sv = " ".join(f"{v:.3f}" for v in fd.alsn_w_v.std(axis=0))
    sl = " ".join(f"{v:.3f}" for v in fd.alsn_w_l.std(axis=0))
    return f"std over {len(fd.alsn_w_v)} samples: w_v P2-P5 {sv}; w_l L1-L4 {sl}"


def figure3(fd: FigData, n_samples: int):
    """ALSN level weights of up to n_samples test samples, sorted by difficulty (easy -> hard)."""
    rows = select_by_difficulty(fd, n_samples)
    fig = _new_figure(7.2, 5.0)
    axd, axv, axl = fig.subplots(3, 1, sharex=True, gridspec_kw={"height_ratios": [1.0, 2.2, 2.2]})
    x = np.arange(len(rows))
    axd.plot(x, fd.difficulty[rows], color="0.25", linewidth=1.2)
    axd.set_ylabel("difficulty")
    axd.set_title(f"ALSN level weights of {len(rows)} test samples, easy \u2192 hard ({fd.model})\n{weight_spread(fd)}",
                  parse_math=False)
    _stacked(axv, fd.alsn_w_v[rows], VIS_LEVELS)
    axv.set_ylabel("visual weight $w_v$")
    _stacked(axl, fd.alsn_w_l[rows], TXT_LEVELS)
    axl.set_ylabel("language weight $w_l$")
    axl.set_xlabel("test samples sorted by difficulty (easy \u2192 hard)")
    # a legend-width spacer on the difficulty panel keeps the three x-axes aligned
    axd.legend(handles=[], loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, title="level ")
    axd.get_legend().set_visible(False)
    fig.get_layout_engine().set(h_pad=0.04)
    return fig


def _radar(ax, w_v: np.ndarray, w_l: np.ndarray, rmax: float) -> None:
    angles = np.linspace(0, 2 * np.pi, 4, endpoint=False)  # P2/L1 at the top, then clockwise
    ax.set_theta_direction(-1)
    ax.set_theta_offset(np.pi / 2)
    closed = np.concatenate([angles, angles[:1]])
    ref = np.full(5, 0.25)
    ax.plot(closed, ref, color="0.6", linewidth=0.8, linestyle=":", label="uniform")
    for w, color, lab, style in ((w_v, "#4477AA", "visual P2..P5", "-"), (w_l, "#EE6677", "language L1..L4", "--")):
        vals = np.concatenate([w, w[:1]])
        ax.plot(closed, vals, color=color, linewidth=1.6, linestyle=style, label=lab)
        ax.fill(closed, vals, color=color, alpha=0.15)
    ax.set_xticks(angles)
    ax.set_xticklabels([f"{v}\n{t}" for v, t in zip(VIS_LEVELS, TXT_LEVELS)])
    ax.set_ylim(0, rmax)
    ticks = [t for t in (0.25, 0.5, 0.75) if t < rmax]
    ax.set_yticks(ticks)
    ax.set_yticklabels([f"{t:g}" for t in ticks], fontsize=7, color="0.4")
    ax.set_rlabel_position(45)
    ax.tick_params(axis="x", pad=0, labelsize=7.5)
    ax.spines["polar"].set_color("0.7")
    ax.grid(color="0.85", linewidth=0.6)


def figure4(fd: FigData, images: Mapping[int, np.ndarray] | None):
    """Radar charts of the level weights of one representative sample per scene type, with its
    image (looked up in `images` by sample index) and caption."""
    reps = representatives(fd)
    present = [r for r in reps.values() if r is not None]
    top = max((float(max(fd.alsn_w_v[r].max(), fd.alsn_w_l[r].max())) for r in present), default=0.5)
    rmax = min(1.0, math.ceil(max(top, 0.3) * 10 + 1e-9) / 10)
    fig = _new_figure(7.2, 5.2)
    grid = fig.add_gridspec(3, 4, height_ratios=[1.0, 1.15, 0.75])
    for col, (t, r) in enumerate(reps.items()):
        ax_img = fig.add_subplot(grid[0, col])
        ax_img.set_xticks([])
        ax_img.set_yticks([])
        for s in ax_img.spines.values():
            s.set_visible(True)
            s.set_color("0.7")
        ax_txt = fig.add_subplot(grid[2, col])
        ax_txt.axis("off")
        if r is None:
            ax_img.set_title(f"{t}", fontweight="bold", parse_math=False)
            ax_img.text(0.5, 0.5, f"no {t}\nsample", ha="center", va="center", transform=ax_img.transAxes,
                        color="0.4", parse_math=False)
            fig.add_subplot(grid[1, col]).axis("off")
            continue
        idx = int(fd.sample_index[r])
        ax_img.set_title(f"{t}", fontweight="bold", parse_math=False)
        img = None if images is None else images.get(idx)
        if img is None:
            ax_img.text(0.5, 0.5, "image not\navailable", ha="center", va="center", transform=ax_img.transAxes,
                        color="0.4", parse_math=False)
        else:
            ax_img.imshow(np.asarray(img), interpolation="nearest")
        ax_rad = fig.add_subplot(grid[1, col], projection="polar")
        _radar(ax_rad, fd.alsn_w_v[r], fd.alsn_w_l[r], rmax)
        caption = textwrap.fill(plain_text(str(fd.caption[r])), width=30, max_lines=6, placeholder=" \u2026")
        ax_txt.text(0.5, 1.0, f"test #{idx}, difficulty {fd.difficulty[r]:.2f}", ha="center", va="top",
                    fontsize=7.5, color="0.35", transform=ax_txt.transAxes, parse_math=False)
        ax_txt.text(0.5, 0.86, caption, ha="center", va="top", fontsize=7.5, transform=ax_txt.transAxes,
                    parse_math=False, linespacing=1.25)
    handles, labels = next(
        (a.get_legend_handles_labels() for a in fig.axes if a.name == "polar"), ([], [])
    )
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=3, frameon=False)
    per = "difficulty quarter" if list(reps) == list(QUARTERS) else "scene type"
    fig.suptitle(f"ALSN level weights of one representative test sample per {per} ({fd.model})\n{weight_spread(fd)}",
                 fontsize=9)
    fig.get_layout_engine().set(w_pad=0.12, wspace=0.06)
    return fig


def tsne_points(fd: FigData, n_samples: int, pca_dim: int, perplexity: float, seed: int) -> dict:
    """2-d t-SNE of teacher and student level features (see the module docstring for the steps).

    Returns {"xy": [2*4*n, 2], "model": ["teacher"|"student"], "level": [0..3], "dim": d, "n": n}."""
    from scipy.linalg import orthogonal_procrustes
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    order = np.argsort(fd.sample_index, kind="stable")
    rows = order if n_samples >= len(order) else order[np.round(np.linspace(0, len(order) - 1, n_samples)).astype(int)]
    n = len(rows)

    def unit(a: np.ndarray) -> np.ndarray:
        a = a[rows].reshape(n * 4, -1).astype(np.float64)
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    s, t = unit(fd.student_levels), unit(fd.teacher_levels)
    d = int(max(1, min(pca_dim, s.shape[1], t.shape[1], 4 * n - 1)))
    with threadpool_limits(limits=1):
        zs = PCA(n_components=d, svd_solver="full").fit_transform(s)
        zt = PCA(n_components=d, svd_solver="full").fit_transform(t)
        rot, _ = orthogonal_procrustes(zs, zt)
        zs = zs @ rot
        zs /= max(np.sqrt((zs**2).sum(1).mean()), 1e-12)
        zt /= max(np.sqrt((zt**2).sum(1).mean()), 1e-12)
        x = np.concatenate([zt, zs])
        perp = float(min(perplexity, max(1.0, (len(x) - 1) / 3.0)))
        xy = TSNE(n_components=2, perplexity=perp, init="pca", learning_rate="auto", random_state=seed,
                  method="barnes_hut" if len(x) > 200 else "exact").fit_transform(x)
    model = np.array(["teacher"] * (4 * n) + ["student"] * (4 * n))
    level = np.tile(np.arange(4), 2 * n)
    return {"xy": xy, "model": model, "level": level, "dim": d, "n": n, "perplexity": perp}


def figure5(fd: FigData, n_samples: int, pca_dim: int, perplexity: float, seed: int):
    """t-SNE of the pooled P2..P5 features of teacher and student, colour = level, marker = model."""
    from matplotlib.lines import Line2D

    pts = tsne_points(fd, n_samples, pca_dim, perplexity, seed)
    fig = _new_figure(6.4, 5.0)
    ax = fig.add_subplot()
    markers = {"teacher": "o", "student": "^"}
    for m in ("teacher", "student"):
        for k in range(4):
            sel = (pts["model"] == m) & (pts["level"] == k)
            ax.scatter(pts["xy"][sel, 0], pts["xy"][sel, 1], s=14, marker=markers[m], c=LEVEL_COLORS[k],
                       alpha=0.75, linewidths=0.3, edgecolors="0.2" if m == "teacher" else "none")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("t-SNE 1")
    ax.set_ylabel("t-SNE 2")
    ax.set_title(
        f"t-SNE of pooled level features, {pts['n']} test samples ({fd.model})\n"
        f"per-side PCA to {pts['dim']} dims + Procrustes, perplexity {pts['perplexity']:g}, seed {seed}",
        parse_math=False,
    )
    lv = [Line2D([], [], marker="s", linestyle="", color=LEVEL_COLORS[k], label=f"{VIS_LEVELS[k]}") for k in range(4)]
    md = [Line2D([], [], marker=markers[m], linestyle="", color="0.3", label=m) for m in ("teacher", "student")]
    leg1 = ax.legend(handles=lv, title="level", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.add_artist(leg1)
    ax.legend(handles=md, title="model", loc="upper left", bbox_to_anchor=(1.01, 0.55), frameon=False)
    return fig


def _heatmap(ax, m: np.ndarray, title: str):
    im = ax.imshow(m, vmin=-1.0, vmax=1.0, cmap="RdBu_r")
    for i in range(4):
        for j in range(4):
            v = float(m[i, j])
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8.5,
                    color="white" if abs(v) > 0.6 else "black")
        ax.add_patch(_rect(i))
    ax.set_xticks(range(4), TXT_LEVELS)
    ax.set_yticks(range(4), VIS_LEVELS)
    ax.set_xlabel("language level")
    ax.set_ylabel("visual level")
    ax.set_title(title, parse_math=False)
    for s in ax.spines.values():
        s.set_visible(False)
    return im


def _rect(i: int):
    from matplotlib.patches import Rectangle

    return Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.4, clip_on=False)


def figure6(fd: FigData):
    """4x4 cross-modal cosine similarity P2..P5 x L1..L4: one sample and the mean, scale [-1, 1]."""
    r = median_difficulty_row(fd)
    fig = _new_figure(7.2, 3.4)
    a, b = fig.subplots(1, 2)
    kind = f"{fd.scene_type[r]}, " if fd.scene_type[r] else ""
    _heatmap(a, fd.crossmodal_sim[r], f"(a) test #{int(fd.sample_index[r])} ({kind}median difficulty)")
    im = _heatmap(b, fd.crossmodal_sim.mean(0), f"(b) mean over {fd.n} test samples")
    cb = fig.colorbar(im, ax=[a, b], shrink=0.9, ticks=[-1, -0.5, 0, 0.5, 1])
    cb.set_label("cosine similarity (fixed scale)")
    fig.suptitle(f"Cross-modal similarity of pyramid levels; outlined: P2-L1 ... P5-L4 ({fd.model})", fontsize=10)
    return fig


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def save_figure(fig, out_dir: Path, stem: str) -> list[Path]:
    """Write `stem`.png and `stem`.pdf without dates or versions in their metadata (atomically)."""
    paths = []
    for ext, meta in (("png", PNG_METADATA), ("pdf", PDF_METADATA)):
        p = out_dir / f"{stem}.{ext}"
        tmp = out_dir / f".{stem}.tmp.{ext}"
        fig.savefig(tmp, format=ext, metadata=meta, dpi=PNG_DPI)
        os.replace(tmp, p)
        paths.append(p)
    return paths


def load_test_images(data_root: str | Path, sample_indices: list[int]) -> dict[int, np.ndarray]:
    """The test images at `sample_indices` of a processed dataset (prepare's output)."""
    from cmapkd.data import ImageTextDataset

    ds = ImageTextDataset(data_root, "test")
    out = {}
    for i in sorted(set(sample_indices)):
        if not 0 <= i < len(ds):
            raise ReportError(f"{Path(data_root) / 'manifest-test.jsonl'}: figdata sample_index {i} is out of range (test has {len(ds)} images)")
        out[i] = np.array(ds.images[i], copy=True)
    return out


def write_figures(
    fd: FigData,
    out_dir: str | Path,
    *,
    images: Mapping[int, np.ndarray] | None,
    fig3_samples: int = 100,
    tsne_samples: int = 200,
    tsne_pca_dim: int = 32,
    tsne_perplexity: float = 30.0,
    tsne_seed: int = 0,
) -> list[Path]:
    """Figures 3-6 of `fd` as PNG and PDF in out_dir (`FIGURE_FILES`)."""
    import logging

    import matplotlib

    logging.getLogger("fontTools").setLevel(logging.WARNING)  # PDF font subsetting is chatty at INFO
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with matplotlib.rc_context():
        matplotlib.rcdefaults()
        matplotlib.rcParams.update(RC)
        makers = (
            ("fig3_alsn_weights", lambda: figure3(fd, fig3_samples)),
            ("fig4_alsn_radar", lambda: figure4(fd, images)),
            ("fig5_tsne_levels", lambda: figure5(fd, tsne_samples, tsne_pca_dim, tsne_perplexity, tsne_seed)),
            ("fig6_crossmodal_sim", lambda: figure6(fd)),
        )
        for stem, make in makers:
            written += save_figure(make(), out, stem)
    return written
