"""Run settings as dataclasses, and the argparse flags made from them.

Every field of a settings dataclass becomes a ``--field-name`` flag whose help text is the
field's docstring (the string literal written under it in the class body), so the class is the
single place where an option is named, typed, defaulted and explained:

    @dataclass
    class TrainConfig:
        steps: int = 1000
        \"\"\"optimizer steps to run\"\"\"

Supported field types: str, int, float, bool (``--flag`` / ``--no-flag``), ``X | None`` and
``tuple[str, ...]`` / ``tuple[int, ...]`` (one or more values).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the docstring written under it in the class body ({} if no source)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for node, nxt in zip(body, body[1:], strict=False):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(the type a value is parsed as, whether None is allowed)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type,
                            skip: tuple[str, ...] = ()) -> None:
    """One flag per field of the dataclass ``cls`` (defaults and help from the class)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        typ, _ = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = docs.get(f.name, "")
        if typ is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=default, help=help_text)
        elif typing.get_origin(typ) is tuple:
            item = typing.get_args(typ)[0]
            parser.add_argument(flag, dest=f.name, nargs="+", default=default, type=item,
                                metavar=f.name.upper(), help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=typ, default=default,
                                metavar=f.name.upper(), help=help_text)


def dataclass_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """Build ``cls`` from the parsed flags (list values become tuples)."""
    values = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if hasattr(args, f.name):
            v = getattr(args, f.name)
            values[f.name] = tuple(v) if isinstance(v, list) else v
    return cls(**values)


def parse_overrides(items: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """``("segment_len=64", "layers=[\\"pythia\\",\\"infini\\"]")`` -> dict; values are JSON
    when they parse as JSON, else strings."""
    import json

    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"model option {item!r} must look like KEY=VALUE, e.g. segment_len=64")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out[key.strip()] = tuple(value) if isinstance(value, list) else value
    return out
