"""Official VQA accuracy on hand-computed cases, normalisation, and the answer-head probe."""

import numpy as np
import pytest
import torch

from cmapkd.eval.vqa import (answers_from_annotations, flatten_vqa, normalize_answer, train_vqa_probe,
                             vqa_accuracy, vqa_question_accuracy)


@pytest.mark.parametrize("n_match, expected", [
    # 10 leave-one-out subsets of 9 annotators; each scores min(matches in subset / 3, 1).
    (0, 0.0),
    (1, 0.3),  # 9 subsets keep the match (1/3), 1 drops it (0): 9/3/10 = 0.3
    (2, 0.6),  # 8 subsets keep both (2/3), 2 keep one (1/3): (16/3 + 2/3)/10 = 0.6
    (3, 0.9),  # 7 subsets keep all three (1), 3 keep two (2/3): (7 + 2)/10 = 0.9
    (4, 1.0),  # every subset keeps at least three
    (10, 1.0),
])
def test_accuracy_by_number_of_matching_annotators(n_match, expected):
    gts = ["2"] * n_match + ["3"] * (10 - n_match)
    assert vqa_question_accuracy("2", gts) == pytest.approx(expected)


@pytest.mark.parametrize("pred, norm", [
    ("Two.", "2"), ("a dog", "dog"), ("The Dog ", "dog"), ("yes!", "yes"), ("none", "0"),
    ("dont", "don't"), ("3,000", "3000"), ("t-shirt", "t shirt"), ("red , white", "red white"),
    ("2.5", "2.5"), ("an\tapple", "apple"),
])
def test_official_normalisation(pred, norm):
    assert normalize_answer(pred) == norm


def test_normalised_prediction_matches():
    # "Two." -> "2" matches the two "2"s: 0.6 as above; "a dog" -> "dog" matches all ten: 1.0
    assert vqa_question_accuracy("Two.", ["2", "2"] + ["3"] * 8) == pytest.approx(0.6)
    assert vqa_question_accuracy("a dog", ["dog"] * 10) == 1.0
    # the official script does not digit-normalise the ground truth (VQAv2 stores it normalised)
    assert vqa_question_accuracy("2", ["Two"] * 10) == 0.0
    assert vqa_question_accuracy("2", ["Two"] * 10, normalize_gt=True) == 1.0


def _ann(qid, answers, answer_type):
    return {"question_id": qid, "image_id": 1, "answer_type": answer_type, "question_type": "what",
            "answers": [{"answer": a, "answer_id": i + 1, "answer_confidence": "yes"} for i, a in enumerate(answers)]}


def test_vqa_accuracy_json_formats(tmp_path):
    import json

    anns = {"annotations": [
        _ann(1, ["yes"] * 10, "yes/no"),                   # pred "Yes" -> 1.0
        _ann(2, ["2"] * 2 + ["3"] * 8, "number"),           # pred "two" -> 0.6
        _ann(3, ["red"] * 3 + ["blue"] * 7, "other"),       # pred "red." -> 0.9
        _ann(4, ["dog"] * 10, "other"),                     # pred "cat" -> 0.0
    ]}
    questions = {"questions": [{"question_id": q, "image_id": 1, "question": "?"} for q in (1, 2, 3, 4)]}
    preds = [{"question_id": 1, "answer": "Yes"}, {"question_id": 2, "answer": "two"},
             {"question_id": 3, "answer": "red."}, {"question_id": 4, "answer": "cat"}]
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(anns))
    r = vqa_accuracy(questions, path, preds)
    assert r["overall"] == pytest.approx((1.0 + 0.6 + 0.9 + 0.0) / 4)
    assert r["per_answer_type"] == pytest.approx({"yes/no": 1.0, "number": 0.6, "other": 0.45})
    assert flatten_vqa(r) == pytest.approx({"vqa_probe_overall": 0.625, "vqa_probe_number": 0.6,
                                            "vqa_probe_other": 0.45, "vqa_probe_yes_no": 1.0})
    assert answers_from_annotations(anns, [2])[0] == ["2"] * 2 + ["3"] * 8
    with pytest.raises(ValueError, match="1 missing"):
        vqa_accuracy(None, anns, preds[:3])
    with pytest.raises(ValueError, match="answered twice"):
        vqa_accuracy(None, anns, preds + preds[:1])


def _toy_task(n, seed):
    """Answer = f(image cluster, question type): 4 clusters x 3 question types -> 12 answers;
    8 of 10 annotators give the right answer, 2 a random one."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(4, 16))
    qcentres = np.random.default_rng(98).normal(size=(3, 16))
    c, t = rng.integers(0, 4, n), rng.integers(0, 3, n)
    img = centres[c] + 0.3 * rng.normal(size=(n, 16))
    q = qcentres[t] + 0.3 * rng.normal(size=(n, 16))
    names = [f"answer{k}" for k in range(12)]
    answers = [[names[3 * ci + ti]] * 8 + list(rng.choice(names, 2)) for ci, ti in zip(c, t)]
    return torch.tensor(img, dtype=torch.float32), torch.tensor(q, dtype=torch.float32), answers


def test_probe_learns_toy_task_and_is_deterministic():
    img, q, answers = _toy_task(600, seed=0)
    img_te, q_te, answers_te = _toy_task(200, seed=1)
    kw = dict(top_n=20, hidden=64, epochs=15, lr=3e-3, batch_size=64, seed=7)
    rng_before = torch.get_rng_state()
    probe = train_vqa_probe(img, q, answers, **kw)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is left alone
    pred = probe.predict(img_te, q_te)
    acc = np.mean([vqa_question_accuracy(p, gt) for p, gt in zip(pred, answers_te)])
    assert acc > 0.8  # chance is about 1/12
    assert probe.loss_history[-1] < probe.loss_history[0]
    again = train_vqa_probe(img, q, answers, **kw)
    assert again.vocab == probe.vocab and again.loss_history == probe.loss_history
    for a, b in zip(probe.head.state_dict().values(), again.head.state_dict().values()):
        assert torch.equal(a, b)
    assert again.predict(img_te, q_te) == pred
    other = train_vqa_probe(img, q, answers, **{**kw, "seed": 8})
    assert other.loss_history != probe.loss_history
