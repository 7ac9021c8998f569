"""VQAv2: the official VQA accuracy, and an answer-head PROBE for dual encoders.

Accuracy (official `vqaEval.py`, ANCHORS.md section 3.6): for each question, each of the 10
annotators is left out in turn and the prediction scores min(#matches among the other 9 / 3, 1);
the question's accuracy is the mean over the 10 subsets (1 match -> 0.3, 2 -> 0.6, 3 -> 0.9,
4 or more -> 1). Overall and per answer type (`yes/no`, `number`, `other`) are means over
questions, reported here as fractions and not rounded (the official script prints percentages
rounded to 2 decimals). Normalisation is the official one: the prediction goes through
`processPunctuation` then `processDigitArticle` (lowercase, number words -> digits, articles
dropped, apostrophe-less contractions restored); a ground-truth answer only through
`processPunctuation`, and only when the 10 answers are not all identical, because VQAv2's
stored answers are already normalised. `normalize_gt=True` (not official) normalises the
ground truth fully, for synthetic sets whose answers were not.

A CLIP dual encoder cannot answer questions, so VQA is measured with a PROBE: a small answer head
on frozen image and question embeddings, trained with the same fixed recipe and budget for every
model (`train_vqa_probe`). Its scores are probe scores, never zero-shot numbers.
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------- normalisation
# Tables copied from the official evaluation (GT-VQA/VQA PythonEvaluationTools/vqaEval.py),
# quirks included (e.g. "somebody'd" -> "somebodyd"; capitalised keys never match lowercased words).
_CONTRACTIONS = dict(pair.split(":") for pair in """
aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've
couldnt've:couldn't've didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've
hadn'tve:hadn't've hasnt:hasn't havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's
howd:how'd howll:how'll hows:how's Id've:I'd've I'dve:I'd've Im:I'm Ive:I've isnt:isn't itd:it'd
itd've:it'd've it'dve:it'd've itll:it'll let's:let's maam:ma'am mightnt:mightn't
mightnt've:mightn't've mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've
neednt:needn't notve:not've oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at
'ow'sat:'ow's'at shant:shan't shed've:she'd've she'dve:she'd've she's:she's shouldve:should've
shouldnt:shouldn't shouldnt've:shouldn't've shouldn'tve:shouldn't've somebody'd:somebodyd
somebodyd've:somebody'd've somebody'dve:somebody'd've somebodyll:somebody'll somebodys:somebody's
someoned:someone'd someoned've:someone'd've someone'dve:someone'd've someonell:someone'll
someones:someone's somethingd:something'd somethingd've:something'd've
something'dve:something'd've somethingll:something'll thats:that's thered:there'd
thered've:there'd've there'dve:there'd've therere:there're theres:there's theyd:they'd
theyd've:they'd've they'dve:they'd've theyll:they'll theyre:they're theyve:they've twas:'twas
wasnt:wasn't wed've:we'd've we'dve:we'd've weve:we've werent:weren't whatll:what'll
whatre:what're whats:what's whatve:what've whens:when's whered:where'd wheres:where's
whereve:where've whod:who'd whod've:who'd've who'dve:who'd've wholl:who'll whos:who's
whove:who've whyll:why'll whyre:why're whys:why's wont:won't wouldve:would've wouldnt:wouldn't
wouldnt've:wouldn't've wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll y'allll:y'all'll
yall'd've:y'all'd've y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd youd've:you'd've
you'dve:you'd've youll:you'll youre:you're youve:you've
""".split())
_NUMBERS = dict(zip("none zero one two three four five six seven eight nine ten".split(),
                    "0 0 1 2 3 4 5 6 7 8 9 10".split()))
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: a period not followed by a digit
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


@functools.lru_cache(maxsize=65536)  # answers repeat: each is normalised once per process
def process_punctuation(text: str) -> str:
    """Official `processPunctuation`: a punctuation mark is deleted if it touches a space in the
    input (or the input has a digit,digit comma), otherwise replaced by a space; then periods not
    followed by a digit are deleted."""
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # the official call passes re.UNICODE (== 32) as `count`: at most 32 periods are removed
    return _PERIOD_STRIP.sub("", out, count=int(re.UNICODE))


def process_digit_article(text: str) -> str:
    """Official `processDigitArticle`: lowercase, split on whitespace, number words -> digits,
    drop articles, restore contractions, join with single spaces."""
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def _clean(text: str) -> str:
    return str(text).replace("\n", " ").replace("\t", " ").strip()


@functools.lru_cache(maxsize=65536)
def normalize_answer(text: str) -> str:
    """The official normalisation of a predicted answer."""
    return process_digit_article(process_punctuation(_clean(text)))


# ----------------------------------------------------------------------------- accuracy
def vqa_question_accuracy(prediction: str, gt_answers: Sequence[str], normalize_gt: bool = False) -> float:
    """Official accuracy of one prediction against its annotators' answers (normally 10):
    the mean over leave-one-annotator-out subsets of min(#matches in the subset / 3, 1)."""
    if not gt_answers:
        raise ValueError("a question needs at least one ground-truth answer")
    pred = normalize_answer(prediction)
    gts = [_clean(a) for a in gt_answers]
    if normalize_gt:
        gts = [normalize_answer(a) for a in gts]
    elif len(set(gts)) > 1:
        gts = [process_punctuation(a) for a in gts]
    matches = [a == pred for a in gts]
    total = sum(matches)
    return sum(min(1.0, (total - m) / 3) for m in matches) / len(matches)


def _load(obj, key: str, what: str) -> list[dict]:
    if isinstance(obj, (str, Path)):
        with open(obj) as f:
            data = json.load(f)
        where = str(obj)
    else:
        data, where = obj, what
    if isinstance(data, dict):
        if key not in data:
            raise ValueError(f"{where}: no '{key}' list in the {what} JSON")
        data = data[key]
    return list(data)


def vqa_accuracy(questions, annotations, predictions, normalize_gt: bool = False) -> dict:
    """Official VQA accuracy, as fractions: `{"overall": a, "per_answer_type": {type: a},
    "per_question": {question_id: a}}`.

    Inputs in the VQAv2 formats, each a path or the loaded JSON: the questions file (`{"questions":
    [...]}`, or None to skip the check that it lists the same questions), the annotations file
    (`{"annotations": [{question_id, answer_type, answers: [{answer, ...}]}]}`) and the results
    list `[{question_id, answer}]`, which must answer every annotated question exactly once.
    """
    anns = _load(annotations, "annotations", "annotations")
    preds = _load(predictions, "predictions", "predictions")
    ann_ids = [a["question_id"] for a in anns]
    if len(set(ann_ids)) != len(ann_ids):
        raise ValueError("annotations: a question_id appears more than once")
    if questions is not None:
        q_ids = {q["question_id"] for q in _load(questions, "questions", "questions")}
        if q_ids != set(ann_ids):
            only_q, only_a = len(q_ids - set(ann_ids)), len(set(ann_ids) - q_ids)
            raise ValueError(f"questions and annotations list different question ids "
                             f"({only_q} only in questions, {only_a} only in annotations)")
    answer_of: dict = {}
    for row in preds:
        qid = row["question_id"]
        if qid in answer_of:
            raise ValueError(f"predictions: question_id {qid} is answered twice")
        answer_of[qid] = row["answer"]
    missing = [q for q in ann_ids if q not in answer_of]
    extra = set(answer_of) - set(ann_ids)
    if missing or extra:
        raise ValueError(f"predictions must answer exactly the annotated questions: {len(missing)} missing "
                         f"(e.g. {missing[:3]}), {len(extra)} unknown (e.g. {sorted(extra)[:3]})")

    per_question, by_type = {}, {}
    for a in anns:
        acc = vqa_question_accuracy(answer_of[a["question_id"]], [x["answer"] for x in a["answers"]], normalize_gt)
        per_question[a["question_id"]] = acc
        by_type.setdefault(a.get("answer_type", "other"), []).append(acc)
    return {
        "overall": float(np.mean(list(per_question.values()))) if per_question else float("nan"),
        "per_answer_type": {t: float(np.mean(v)) for t, v in sorted(by_type.items())},
        "per_question": per_question,
    }


def flatten_vqa(result: dict, prefix: str = "vqa_probe") -> dict[str, float]:
    """Flat keys for a metrics JSON: `vqa_probe_overall`, `vqa_probe_yes_no`, `vqa_probe_number`, ..."""
    flat = {f"{prefix}_overall": result["overall"]}
    for t, v in result["per_answer_type"].items():
        flat[f"{prefix}_{re.sub(r'[^a-z0-9]+', '_', t.lower()).strip('_')}"] = v
    return flat


def answers_from_annotations(annotations, question_ids: Iterable | None = None) -> list[list[str]]:
    """The annotators' answers per question, in `question_ids` order (default: file order)."""
    anns = {a["question_id"]: a for a in _load(annotations, "annotations", "annotations")}
    ids = list(anns) if question_ids is None else list(question_ids)
    missing = [q for q in ids if q not in anns]
    if missing:
        raise ValueError(f"annotations: no entry for question_id {missing[0]} ({len(missing)} missing)")
    return [[x["answer"] for x in anns[q]["answers"]] for q in ids]


# ----------------------------------------------------------------------------- probe
def build_answer_vocab(answers: Sequence[Sequence[str]], top_n: int) -> list[str]:
    """The `top_n` most frequent normalised annotator answers; ties broken alphabetically."""
    counts = Counter(normalize_answer(a) for per_q in answers for a in per_q)
    counts.pop("", None)
    return [a for a, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top_n]]


def soft_targets(answers: Sequence[Sequence[str]], vocab: Sequence[str]) -> torch.Tensor:
    """VQA soft targets `[n_questions, len(vocab)]`: min(#annotators giving the answer / 3, 1).
    Answers outside the vocabulary are dropped (their question can still be scored 0 by the head)."""
    index = {a: i for i, a in enumerate(vocab)}
    target = torch.zeros(len(answers), len(vocab))
    for row, per_q in enumerate(answers):
        for a, c in Counter(normalize_answer(x) for x in per_q).items():
            if a in index:
                target[row, index[a]] = min(c / 3, 1.0)
    return target


class VQAProbeHead(nn.Module):
    """The probe's answer head: an MLP on [i; q; i*q] of the L2-normalised image and question
    embeddings, giving one logit per vocabulary answer. The encoders stay frozen."""

    def __init__(self, dim: int, n_answers: int, hidden: int = 512, dropout: float = 0.1):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(3 * dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, n_answers)
        )

    def forward(self, image_emb: torch.Tensor, question_emb: torch.Tensor) -> torch.Tensor:
        i, q = F.normalize(image_emb, dim=-1), F.normalize(question_emb, dim=-1)
        return self.mlp(torch.cat([i, q, i * q], dim=-1))


@dataclass
class VQAProbe:
    """A trained VQA probe: the head, its answer vocabulary and the recipe it was trained with."""

    head: VQAProbeHead
    vocab: list[str]
    recipe: dict
    loss_history: list[float] = field(default_factory=list)  # mean training loss per epoch

    @torch.no_grad()
    def predict(self, image_emb, question_emb, batch_size: int = 4096) -> list[str]:
        """The probe's answer per (image, question) pair: the highest-scoring vocabulary answer
        (the first one on a tie)."""
        img, q = _embeddings_pair(image_emb, question_emb)
        self.head.eval()
        device = next(self.head.parameters()).device
        out = []
        for s in range(0, len(img), batch_size):
            logits = self.head(img[s : s + batch_size].to(device), q[s : s + batch_size].to(device))
            out += [self.vocab[i] for i in logits.argmax(dim=1).tolist()]
        return out


def _embeddings_pair(image_emb, question_emb) -> tuple[torch.Tensor, torch.Tensor]:
    def as_float(x):
        return (x.detach() if torch.is_tensor(x) else torch.as_tensor(np.asarray(x))).float().cpu()

    img, q = as_float(image_emb), as_float(question_emb)
    if img.ndim != 2 or img.shape != q.shape:
        raise ValueError(f"image and question embeddings must both be [n, dim] with the same shape, "
                         f"got {tuple(img.shape)} and {tuple(q.shape)}")
    return img, q


def train_vqa_probe(
    image_emb_train,
    question_emb_train,
    answers_train: Sequence[Sequence[str]],
    *,
    top_n: int = 1000,
    hidden: int = 512,
    dropout: float = 0.1,
    epochs: int = 10,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 256,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> VQAProbe:
    """Train the VQA PROBE on frozen embeddings (row i of each input is training question i; the
    image embedding is that question's image). Recipe: vocabulary of the `top_n` most frequent
    training answers, soft targets min(count/3, 1), binary cross-entropy summed over answers,
    AdamW at a constant `lr` for `epochs` epochs of shuffled mini-batches. Pass the same
    arguments for every model compared. Deterministic for a fixed seed on CPU (same thread count);
    the global RNG state is left untouched."""
    img, q = _embeddings_pair(image_emb_train, question_emb_train)
    if len(answers_train) != len(img):
        raise ValueError(f"answers_train has {len(answers_train)} questions but the embeddings have {len(img)} rows")
    vocab = build_answer_vocab(answers_train, top_n)
    if not vocab:
        raise ValueError("answers_train has no non-empty answer")
    target = soft_targets(answers_train, vocab)
    recipe = dict(top_n=top_n, hidden=hidden, dropout=dropout, epochs=epochs, lr=lr,
                  weight_decay=weight_decay, batch_size=batch_size, seed=seed)
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        head = VQAProbeHead(img.shape[1], len(vocab), hidden, dropout).to(device)
        # fused: one kernel per step instead of ~10 small ops per tensor (a third of the probe's time on CPU)
        opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
        order_rng = torch.Generator().manual_seed(seed)
        history = []
        for _ in range(epochs):
            head.train()
            total = 0.0
            for idx in torch.randperm(len(img), generator=order_rng).split(batch_size):
                logits = head(img[idx].to(device), q[idx].to(device))
                loss = F.binary_cross_entropy_with_logits(logits, target[idx].to(device), reduction="sum") / len(idx)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item() * len(idx)
            history.append(total / len(img))
    return VQAProbe(head=head.eval(), vocab=vocab, recipe=recipe, loss_history=history)
