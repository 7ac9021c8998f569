"""Teacher cache: round trip in fp16 shards, identity checks that refuse a mismatched cache."""

from __future__ import annotations

import pytest
import torch

from cmapkd.distill.cache import CacheMismatchError, CacheReader, CacheWriter, compare_identity

IDENTITY = {
    "teacher": {"name": "embedded-lite2-minilm", "weights_sha256": "abc", "taps": [1, 2, 3, 4], "image_size": 128},
    "data": {"digest": "d1", "split": "train"},
    "views": {"k": 2, "seed": 0},
}


def write_cache(folder, identity=IDENTITY, shard_rows=4):
    g = torch.Generator().manual_seed(0)
    w = CacheWriter(folder, identity, shard_rows=shard_rows)
    data = {v: {"t_img_emb": torch.randn(10, 3, generator=g), "t_vis_l1": torch.randn(10, 2, 4, 4, generator=g)} for v in range(2)}
    for v in range(2):
        for start in range(0, 10, 3):  # blocks that do not align with shards
            w.writer(f"image-v{v}").add({k: t[start : start + 3] for k, t in data[v].items()})
    record = w.commit()
    return data, record


def test_round_trip_rows_across_shards_fp16(tmp_path):
    data, record = write_cache(tmp_path / "cache")
    assert record["rows"] == {"image-v0": 10, "image-v1": 10}
    assert len(list((tmp_path / "cache").glob("image-v0-*.safetensors"))) == 3  # 4 + 4 + 2 rows
    assert not (tmp_path / "cache.tmp").exists()
    r = CacheReader(tmp_path / "cache", IDENTITY)
    rows = r.rows("image-v1", [9, 0, 5])
    expected = data[1]["t_vis_l1"][[9, 0, 5]]
    torch.testing.assert_close(rows["t_vis_l1"], expected.half().float())
    assert rows["t_vis_l1"].dtype == torch.float32
    assert (rows["t_vis_l1"] - expected).abs().max() < 1e-2  # fp16 storage, close to the original
    assert r.num_rows("image-v0") == 10


@pytest.mark.parametrize(
    "field,change",
    [
        (("teacher", "weights_sha256"), "other"),  # another teacher
        (("teacher", "taps"), [2, 4, 6, 8]),  # other taps
        (("teacher", "image_size"), 160),  # other preprocessing
        (("data", "digest"), "d2"),  # other data
    ],
)
def test_mismatched_identity_is_refused_with_named_field(tmp_path, field, change):
    write_cache(tmp_path / "cache")
    expected = {k: dict(v) for k, v in IDENTITY.items()}
    expected[field[0]][field[1]] = change
    with pytest.raises(CacheMismatchError) as e:
        CacheReader(tmp_path / "cache", expected)
    msg = str(e.value)
    assert ".".join(field) in msg and "identity.json" in msg and "cache_teacher" in msg


def test_missing_cache_is_a_clear_error(tmp_path):
    with pytest.raises(CacheMismatchError, match="no teacher cache here"):
        CacheReader(tmp_path / "nothing", IDENTITY)


def test_compare_identity_treats_tuples_as_lists():
    a = {"teacher": {"taps": (1, 2)}}
    assert compare_identity(a, {"teacher": {"taps": [1, 2]}}) == []
    assert compare_identity(a, {"teacher": {"taps": [1, 3]}}) == ["teacher.taps: cache has [1, 3], expected [1, 2]"]
