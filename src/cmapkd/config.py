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
class Params:
    """The whole params.yaml. Top-level knobs are plain keys so `dvc exp run -S lambda2=0.3` works."""

    seed: int
    # which of the two settings this params file describes; the embedded default runs offline
    setting: Literal["embedded", "paper"]
    # METHOD.md section 4: L_total = l1*L_intra + l2*L_align + l3*L_relation + l4*L_task
    lambda1: float
    lambda2: float
    lambda3: float
    lambda4: float


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


def load_params(
    keys: typing.Iterable[str] | None = None,
    path: str | Path = PARAMS_FILE,
    overrides: typing.Iterable[str] = (),
) -> Params:
    """Load params.yaml into a typed `Params`.

    `keys`: the top-level keys (sections or scalars) the calling stage declares in dvc.yaml; only
    those are type-checked and filled, the others are None. Unknown top-level keys are always an
    error, so a typo anywhere in the file is caught. `keys=None` checks the whole file.
    """
    path = Path(path)
    raw = apply_overrides(read_params_file(path), overrides, path)
    only = None if keys is None else set(keys)
    if only is not None:
        names = {f.name for f in dataclasses.fields(Params)}
        bad = sorted(only - names)
        if bad:
            raise ParamsError(f"{path}: stage asked for unknown key(s) {bad}; known: {sorted(names)}")
    return _build(Params, raw, "", path, only)


def to_dict(obj: Any) -> Any:
    """A params object (or part of one) as plain YAML/JSON-able data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


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
]
