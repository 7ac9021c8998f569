"""The typed params loader: good files load, bad files fail with an error naming the key."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from cmapkd import config
from cmapkd.config import ParamsError, apply_overrides, load_params, read_params_file


def write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


@pytest.fixture
def good(project_root) -> dict:
    return read_params_file(project_root / "params.yaml")


def test_project_params_yaml_loads_fully(project_root):
    params = load_params(path=project_root / "params.yaml")
    assert isinstance(params.seed, int)
    assert params.setting == "embedded"
    # METHOD.md section 4 defaults
    assert (params.lambda1, params.lambda2, params.lambda3, params.lambda4) == (1.0, 0.5, 0.3, 0.1)
    assert all(isinstance(getattr(params, f"lambda{i}"), float) for i in range(1, 5))


def test_unknown_top_level_key_names_key_and_suggests(tmp_path, good):
    good["lamda2"] = 0.3
    with pytest.raises(ParamsError) as e:
        load_params(path=write(tmp_path, good))
    msg = str(e.value)
    assert "unknown key 'lamda2'" in msg and "did you mean 'lambda2'" in msg and "params.yaml" in msg


def test_unknown_key_is_caught_even_when_stage_declares_other_keys(tmp_path, good):
    good["sede"] = 1
    with pytest.raises(ParamsError, match="unknown key 'sede'"):
        load_params(["lambda1"], path=write(tmp_path, good))


def test_missing_key_names_key_and_type(tmp_path, good):
    del good["lambda3"]
    with pytest.raises(ParamsError) as e:
        load_params(path=write(tmp_path, good))
    assert "missing key 'lambda3' (float)" in str(e.value)
    assert str(tmp_path / "params.yaml") in str(e.value)


def test_missing_key_outside_declared_keys_is_not_checked(tmp_path, good):
    del good["lambda3"]
    params = load_params(["seed", "lambda2"], path=write(tmp_path, good))
    assert params.seed == good["seed"] and params.lambda2 == 0.5 and params.lambda3 is None


@pytest.mark.parametrize(
    "key,value,expected",
    [("lambda2", "high", "float"), ("seed", 1.5, "int"), ("seed", True, "int"), ("setting", "cloud", "'embedded' | 'paper'")],
)
def test_wrong_type_names_key_expected_type_and_value(tmp_path, good, key, value, expected):
    good[key] = value
    with pytest.raises(ParamsError) as e:
        load_params(path=write(tmp_path, good))
    msg = str(e.value)
    assert f"key '{key}' expects {expected}" in msg and repr(value) in msg and "params.yaml" in msg


def test_int_is_accepted_for_float_and_converted(tmp_path, good):
    good["lambda1"] = 2
    params = load_params(path=write(tmp_path, good))
    assert params.lambda1 == 2.0 and isinstance(params.lambda1, float)


def test_overrides_of_top_level_keys_take_effect(project_root):
    params = load_params(path=project_root / "params.yaml", overrides=["lambda2=0.3", "seed=7"])
    assert params.lambda2 == 0.3 and params.seed == 7
    # the other lambdas are untouched
    assert params.lambda1 == 1.0 and params.lambda4 == 0.1


def test_override_of_missing_key_fails_like_dvc(good):
    with pytest.raises(ParamsError, match="cannot override 'lambda9'"):
        apply_overrides(good, ["lambda9=1.0"])


def test_override_with_wrong_type_is_caught(project_root):
    with pytest.raises(ParamsError, match="key 'lambda2' expects float"):
        load_params(path=project_root / "params.yaml", overrides=["lambda2=abc"])


def test_nested_sections_lists_and_optionals(tmp_path):
    """The schema machinery on a nested section, as later stage sections use it."""

    @dataclass(frozen=True)
    class Inner:
        levels: list[int]
        lr: float
        name: str | None = None

    file = tmp_path / "params.yaml"
    ok = config._build(Inner, {"levels": [2, 3], "lr": 1}, "stage", file)
    assert ok == Inner(levels=[2, 3], lr=1.0, name=None)
    with pytest.raises(ParamsError, match=r"key 'stage.levels\[1\]' expects int, got str 'x'"):
        config._build(Inner, {"levels": [2, "x"], "lr": 1.0}, "stage", file)
    with pytest.raises(ParamsError, match="unknown key 'stage.lrr'.*did you mean 'lr'"):
        config._build(Inner, {"levels": [2], "lrr": 1.0}, "stage", file)
    with pytest.raises(ParamsError, match="missing key 'stage.lr' \\(float\\)"):
        config._build(Inner, {"levels": [2]}, "stage", file)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(path=tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("seed: [1, 2\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(path=bad)


def test_float_in_e_notation_without_dot_is_accepted(project_root):
    """PyYAML reads `3e-3` as a string; `dvc exp run -S lr=3e-3` writes exactly that."""
    params = load_params(path=project_root / "params.yaml", overrides=["lambda2=3e-3"])
    assert params.lambda2 == pytest.approx(0.003)
    with pytest.raises(ParamsError, match="key 'lambda2' expects float"):
        load_params(path=project_root / "params.yaml", overrides=["lambda2=3e-3x"])


def test_ablation_runs_must_name_defined_ablations(tmp_path, good):
    good["ablation_runs"] = ["uniform", "p5onyl"]
    with pytest.raises(ParamsError, match=r"ablation_runs \['p5onyl'\] not defined under `ablations`"):
        load_params(path=write(tmp_path, good))


def test_stage_evals_must_name_intermediate_stages(tmp_path, good):
    good["stage_evals"] = ["stage3", "stage4b"]
    with pytest.raises(ParamsError, match=r"stage_evals \['stage4b'\] unknown"):
        load_params(path=write(tmp_path, good))


def test_overlay_merges_mappings_replaces_lists_and_names_both_files(tmp_path, good, project_root):
    from cmapkd.config import merge_overlay

    base = {"a": {"x": 1, "y": [1, 2]}, "b": 2}
    merged = merge_overlay(base, {"a": {"y": [3], "z": {"k": 0}}, "b": {"new": 1}})
    assert merged == {"a": {"x": 1, "y": [3], "z": {"k": 0}}, "b": {"new": 1}}
    assert base == {"a": {"x": 1, "y": [1, 2]}, "b": 2}  # the input is not changed
    # the paper overlay over the project's params.yaml: paper models, embedded sections kept
    p = load_params(path=project_root / "params.yaml", overlay=project_root / "configs" / "paper.yaml",
                    overrides=["model.student.pretrained=''"])
    assert p.setting == "paper" and p.model.student.open_clip_model == "ViT-B-16" and p.model.student.pretrained == ""
    assert p.distill.stage1.lr == 5e-5 and p.distill.batch_size == good["distill"]["batch_size"]
    # a typo in the overlay is reported with both files named
    bad = tmp_path / "overlay.yaml"
    bad.write_text("distill:\n  stage_1: {epochs: 1}\n")
    with pytest.raises(ParamsError, match=r"with .*overlay.yaml merged over it.*unknown key 'distill.stage_1'"):
        load_params(path=write(tmp_path, good), overlay=bad)
