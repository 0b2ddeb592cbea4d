"""Run settings in a file: ``newllm train --config run.yaml`` and the ``config.yaml`` each run
writes into its folder.

A config file is a YAML (or JSON, by the ``.json`` suffix) mapping whose keys are the flags of
``newllm train`` without the dashes, ``batch-size`` or ``batch_size`` alike; the values have the
flags' types (a list, or one string, for the flags that take several values; ``model_options``
may also be a mapping, ``{segment_len: 64}`` for ``segment_len=64``). Flags on the command line
win over the file. Relative paths in a file you write are relative to the current folder, as on
the command line; the ``config.yaml`` a run writes holds every setting, with absolute paths, so
``newllm train --config RUN/config.yaml`` reruns it from anywhere.

    steps: 2000
    data: [data/train.txt]
    model-options: {segment_len: 64}
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import tempfile
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from training.options import _base_type

RUN_CONFIG = "config.yaml"  # the run's settings (config.json beside it is the model's)
PATH_FIELDS = ("data", "val_data", "out", "init", "tokenizer", "cache_dir")
NOT_PATHS = ("", "byte-level", "none")  # values of path fields that name no file


def _type_name(typ: Any) -> str:
    if typing.get_origin(typ) is tuple:
        item = typing.get_args(typ)[0]
        return "a list of " + {int: "integers", float: "numbers", str: "strings"}.get(
            item, str(item))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        typ, str(typ))


def _check(key: str, value: Any, annotation: Any, where: str) -> Any:
    """``value`` as the field's type, or ValueError naming ``key``."""
    typ, optional = _base_type(annotation)
    if value is None and optional:
        return None
    if key == "model_options" and isinstance(value, dict):  # {k: v} -> ("k=<json v>", ...)
        return tuple(f"{k}={json.dumps(v)}" for k, v in value.items())
    if typing.get_origin(typ) is tuple:
        item = typing.get_args(typ)[0]
        items = [value] if isinstance(value, str) and item is str else value
        if isinstance(items, list) and all(_fits(v, item) for v in items):
            return tuple(float(v) if item is float else v for v in items)
    elif _fits(value, typ):
        return float(value) if typ is float else value
    raise ValueError(f"{where}: {key} must be {_type_name(typ)}, got {value!r} "
                     f"({type(value).__name__})")


def _fits(value: Any, typ: Any) -> bool:
    if typ is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, typ)


def _parse(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"config {path}: not valid JSON: {e}") from None
    try:
        import yaml
    except ModuleNotFoundError:
        raise ValueError(f"config {path}: reading YAML needs PyYAML (pip install pyyaml); "
                         "or give the settings as a .json file") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(e, "problem", None) or " ".join(str(e).split())
        raise ValueError(f"config {path}: not valid YAML: {what}{where}") from None


def read_run_config(path: str | Path, cls: type) -> dict[str, Any]:
    """The settings in the file ``path`` as {field name: value} for the dataclass ``cls``;
    ValueError naming the key for an unknown key (with close matches), a key given twice or a
    value of the wrong type."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} not found")
    raw = _parse(path)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"config {path}: must be a mapping of flag names to values, "
                         f"got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).removeprefix("--").replace("-", "_")
        if name not in names:
            spelled = [n.replace("_", "-") for n in names]
            close = difflib.get_close_matches(name.replace("_", "-"), spelled, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"config {path}: unknown setting {key!r}{hint} "
                             f"(the keys are the flags of `newllm train --help`)")
        if name in values:
            raise ValueError(f"config {path}: {name!r} is given twice")
        values[name] = _check(name, value, hints[name], f"config {path}")
    return values


def resolved_settings(cfg: Any) -> dict[str, Any]:
    """Every field of the settings ``cfg`` as plain YAML values (lists, not tuples), the paths
    that exist made absolute so the file works from any folder."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, tuple | list):  # a list too, from code that built cfg by hand
            value = [_absolute(v) if f.name in PATH_FIELDS else v for v in value]
        elif f.name in PATH_FIELDS:
            value = _absolute(value)
        out[f.name.replace("_", "-")] = value
    return out


def _absolute(value: Any) -> Any:
    if not isinstance(value, str | os.PathLike) or value in NOT_PATHS:
        return value
    return str(Path(value).absolute()) if Path(value).exists() else str(value)


def write_run_config(cfg: Any, folder: str | Path, notes: Sequence[str] = ()) -> Path:
    """Write every setting of ``cfg`` to ``folder/config.yaml`` atomically (a temp file renamed
    over it), ``notes`` as comments at the top; returns the path. Without PyYAML the body is
    JSON (which YAML reads too)."""
    folder = Path(folder)
    settings = resolved_settings(cfg)
    try:
        import yaml

        body = yaml.safe_dump(settings, sort_keys=False, default_flow_style=None, width=100)
    except ModuleNotFoundError:
        body = json.dumps(settings, indent=1) + "\n"
    text = "".join(f"# {line}\n" for line in notes) + body
    fd, tmp = tempfile.mkstemp(prefix=".config-", suffix=".yaml.tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, folder / RUN_CONFIG)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return folder / RUN_CONFIG
