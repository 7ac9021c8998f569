"""Tower adapters: real packaged weights give sensible outputs; the embedded pair is 3x smaller."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from cmapkd.config import load_params
from cmapkd.models.encoders import build_encoder
from cmapkd.models.towers import OpenCLIPTokenizer, TimmImageTower, load_efficientnet_lite




def _photo(name: str, size: int) -> torch.Tensor:
    from skimage import data

    img = torch.from_numpy(np.ascontiguousarray(getattr(data, name)())).permute(2, 0, 1)[None].float() / 255
    return F.interpolate(img, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


@pytest.mark.parametrize("name", ["tf_efficientnet_lite2", "tf_efficientnet_lite0"])
def test_packaged_efficientnet_classifies_real_photos(name):
    model = load_efficientnet_lite(name, "package").eval()
    with torch.no_grad():
        for photo, ok in (("chelsea", range(281, 286)), ("coffee", (504, 967))):
            x = _photo(photo, 224) * 2 - 1  # the package's preprocessing: [-1, 1]
            top = int(model(x).argmax())
            assert top in ok, f"{name} says class {top} for skimage '{photo}'"


def test_embedded_teacher_image_tower_taps_and_preprocessing(teacher):
    tower = teacher.image
    assert isinstance(tower, TimmImageTower)
    assert tower.image_size == 128 and tower.mean == (0.5, 0.5, 0.5) and tower.std == (0.5, 0.5, 0.5)
    x = tower.prepare((torch.rand(2, 3, 97, 97) * 255).to(torch.uint8))
    assert x.shape == (2, 3, 128, 128) and x.min() >= -1 and x.max() <= 1
    with torch.no_grad():
        out = tower(x)
    assert [tuple(l.shape[1:]) for l in out.levels] == [(24, 32, 32), (48, 16, 16), (120, 8, 8), (352, 4, 4)]
    assert out.embedding.shape == (2, 256) and out.mask is None
    # the tapped stem is the real ImageNet backbone: the 128 px cat is still a cat
    full = load_efficientnet_lite("tf_efficientnet_lite2", "package").eval()
    with torch.no_grad():
        assert int(full(tower.prepare(_photo("chelsea", 300))).argmax()) in range(281, 286)


def test_minilm_related_sentences_are_closer(teacher):
    tower = teacher.text
    ids, mask = tower.tokenize(["a cat sitting on a mat", "a kitten rests on a rug", "stock markets fell sharply today"])
    k = int(mask.sum(1).argmin())
    assert ids.shape == (3, 32) and mask.dtype == torch.bool and mask[:, 0].all() and not mask[:, -1].any()
    with torch.no_grad():
        out = tower(ids, mask)
    s = F.normalize(out.pooled, dim=-1)  # L4 = the model's own mean pooling (sentence-transformers)
    assert float(s[0] @ s[1]) > float(s[0] @ s[2]) + 0.2
    # the padding after the longest sentence is dropped: its columns change no real token
    n = int(mask.sum(1).max())
    assert len(out.levels) == 4 and all(l.shape == (3, n, 384) for l in out.levels) and out.mask.shape == (3, n)
    assert out.embedding.shape == (3, 256)
    with torch.no_grad():
        full = tower.encoder(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True).hidden_states
        alone = tower(ids[k : k + 1], mask[k : k + 1])  # the shortest sentence alone: fewer columns
    for lv, t in zip(out.levels, tower.taps):
        assert torch.allclose(lv[mask[:, :n]], full[t][:, :n][mask[:, :n]], atol=1e-5)
    assert alone.levels[0].shape[1] == int(mask[k].sum()) < n
    assert torch.allclose(alone.embedding, out.embedding[k : k + 1], atol=1e-5)
    assert torch.allclose(alone.pooled, out.pooled[k : k + 1], atol=1e-5)


def test_open_clip_towers_of_a_tiny_config():
    """The open_clip path (the paper's ViT towers) on the small JSON config shipped in the package."""
    from cmapkd.config import EncoderSpec
    from cmapkd.models.encoders import build_encoder

    torch.manual_seed(0)
    student = build_encoder(EncoderSpec(kind="open_clip", image_size=64, image_taps=[1, 2, 3, 4], text_taps=[1, 2, 3, 4],
                                        context_length=32, embed_dim=256, open_clip_model="CMAPKD-Tiny-8-64")).eval()
    assert student.image.image_size == 64 and student.image.grid == 8
    ids, mask = student.tokenize(["a red apple", "two dogs playing in the snow"])
    with torch.no_grad():
        img = student.image(student.image.prepare(torch.rand(2, 3, 128, 128)))
        txt = student.text(ids, mask)
    assert [tuple(l.shape[1:]) for l in img.levels] == [(128, 8, 8)] * 4  # CLS removed, grid reshaped
    assert [tuple(l.shape[1:]) for l in txt.levels] == [(32, 64)] * 4
    assert img.embedding.shape == txt.embedding.shape == (2, 256)
    # the student's sentence state is the [SEP] (EOT) token of the last tap
    eot = (ids == 102).int().argmax(-1)
    assert torch.equal(txt.pooled, txt.levels[-1][torch.arange(2), eot])
    # encode_text equals open_clip's own encode_text
    with torch.no_grad():
        assert torch.allclose(student.encode_text(ids, mask, normalize=False), student.clip.encode_text(ids), atol=1e-5)
    # level_head(i) is a standalone copy of level_embed(i, .): same values, no shared parameter
    v, l = img.levels[2].mean(dim=(2, 3)), txt.pooled
    clip_params = {id(p) for p in student.clip.parameters()}
    for tower, x in ((student.image, v), (student.text, l)):
        head = tower.level_head(2)
        with torch.no_grad():
            assert torch.allclose(head(x), tower.level_embed(2, x), atol=1e-5)
        assert all(id(p) not in clip_params for p in head.parameters())
        assert sum(p.numel() for p in head.parameters()) > 0


def test_open_clip_bpe_tokenizer_mask_covers_sot_to_eot():
    tok = OpenCLIPTokenizer("ViT-B-16", 77)
    ids, mask = tok(["a photo of a dog!", "hi"])
    eot = ids.argmax(-1)
    assert ids[0, eot[0]] == 49407 and mask.sum(-1).tolist() == (eot + 1).tolist()
    assert (ids == 0)[~mask].all()


def _flops(fn) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def test_student_is_smaller_and_at_most_half_the_teachers_flops(teacher, student):
    """The embedded student (Lite0 @ 64 px + 3 inherited MiniLM layers) against the teacher (Lite2 @
    128 px + 6 MiniLM layers): at most half the FLOPs per image + caption, fewer parameters."""
    n_t = sum(p.numel() for p in teacher.parameters())
    n_s = sum(p.numel() for p in student.parameters())
    ids, mask = student.tokenize(["a small red apple next to a dog on the grass"])
    img = torch.rand(1, 3, 128, 128)
    f_t = _flops(lambda: (teacher.encode_image(img), teacher.encode_text(ids, mask)))
    f_s = _flops(lambda: (student.encode_image(img), student.encode_text(ids, mask)))
    assert n_t / n_s >= 1.2, (n_t, n_s)
    assert f_t / f_s >= 2.0, (f_t, f_s)


def test_encoder_identity_tracks_weights_taps_and_preprocessing(teacher):
    a = teacher.identity()
    assert a == teacher.identity()
    assert a["image"]["taps"] == [1, 2, 3, 4] and a["text"]["taps"] == [2, 3, 5, 6] and a["image"]["size"] == 128
    assert a["text"]["tokenizer"].startswith("hf:") and len(a["weights_sha256"]) == 64
    head = teacher.image.level_heads[0].bias
    saved = head.detach().clone()
    with torch.no_grad():
        head.add_(1.0)
    try:
        assert teacher.identity()["weights_sha256"] != a["weights_sha256"]
    finally:
        with torch.no_grad():
            head.copy_(saved)
    assert teacher.identity()["weights_sha256"] == a["weights_sha256"]


def test_truncated_text_tower_inherits_the_first_layers(teacher):
    """text_layers=N keeps the first N pretrained layers (weight inheritance); tap 0 = token embeddings."""
    import torch

    from cmapkd.models.towers import HFTextTower

    short = HFTextTower("package", [0, 1, 2, 3], 32, 64, num_layers=3).eval()
    full = teacher.text.encoder
    assert len(short.encoder.encoder.layer) == 3
    for a, b in zip(short.encoder.encoder.layer.state_dict().values(),
                    list(full.encoder.layer[:3].state_dict().values())):
        assert torch.equal(a, b)
    ids, mask = short.tokenize(["a cat on a mat"])
    out = short(ids, mask)
    embeddings = short.encoder.embeddings(input_ids=ids)[:, : out.levels[0].shape[1]]  # padding trimmed
    assert torch.allclose(out.levels[0], embeddings, atol=1e-6)
    with pytest.raises(ValueError, match="text_layers 7 outside 1..6"):
        HFTextTower("package", [1, 2, 3, 4], 32, 64, num_layers=7)


def test_length_batches_group_similar_lengths_and_restore_row_order():
    from cmapkd.models.towers import length_batches

    lengths = torch.tensor([5, 1, 9, 3, 3, 7, 2])
    mask = (torch.arange(10)[None, :] < lengths[:, None]).long()
    batches, inverse = length_batches(mask, 3)
    assert [b.tolist() for b in batches] == [[1, 6, 3], [4, 0, 5], [2]]  # by length, ties in row order
    results = [lengths[b] * 10 for b in batches]  # any per-row result computed batch by batch
    assert torch.equal(torch.cat(results)[inverse], lengths * 10)
