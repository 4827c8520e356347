"""Options of a command, declared once: a frozen pydantic model whose fields carry type, default, range and help.

The library entry point of a command takes the model's fields (``@takes(SearchOptions)`` validates its keyword
arguments through the model and calls the function with every field filled in); the CLI generates its flags from
the same model (``add_arguments``) and builds it from argparse's namespace (``from_namespace``). So a flag, its
default, its range and its help text are written in one place, and the library and the CLI cannot drift apart.

    class SearchOptions(Options):
        src: str = opt(..., "checkpoint folder or named source", positional=True)
        budget: int = opt(160, "perplexity evaluations in all", ge=1)

    @takes(SearchOptions)
    def search_checkpoint(src, out, *, budget, ...): ...

Field conventions: ``bool`` fields are ``--flag`` switches (default False); ``Literal`` fields list their choices;
``StrList`` / ``IntList`` / ``FloatList`` fields accept ``256,512`` on the command line and lists in Python;
``positional=True`` makes an argument positional (a ``list`` one takes one or more values). Pure Python + pydantic:
no torch.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import os
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from ctxext.errors import CtxextError


class OptionsError(CtxextError, ValueError):
    """An option value that the command cannot use."""


def _split(kind: Callable[[str], Any]) -> Callable[[Any], Any]:
    def split(value: Any) -> Any:
        if isinstance(value, str):
            try:
                return [kind(x) for x in value.split(",") if x.strip()]
            except ValueError:
                example = "256,512,1024" if kind is int else "0,0.5,1"
                raise ValueError(f"{value!r} is not a comma-separated list, e.g. {example}") from None
        return value

    return split


StrList = Annotated[list[str], BeforeValidator(_split(str))]
IntList = Annotated[list[int], BeforeValidator(_split(int))]
FloatList = Annotated[list[float], BeforeValidator(_split(float))]
DType = Literal["auto", "float32", "bfloat16", "float16"]


def opt(
    default: Any,
    help: str,
    *,
    positional: bool = False,
    metavar: str | None = None,
    flag: str | None = None,
    **constraints: Any,
):
    """A field with its help text; ``constraints`` are pydantic's (``ge``, ``gt``, ``le``, ``min_length`` ...);
    ``...`` as default makes it required; ``flag`` names the command-line flag where the field's name cannot."""
    extra = {"positional": positional, "metavar": metavar, "flag": flag}
    return Field(default, description=help, json_schema_extra=extra, **constraints)


class Options(BaseModel):
    """Base of every command's options: unknown names and wrong types are refused, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _paths_as_text(cls, values: Any) -> Any:
        """Paths (``pathlib.Path`` and other ``os.PathLike``) are taken wherever text is: options hold them as str."""
        if not isinstance(values, dict):
            return values

        def text(v):
            return os.fspath(v) if isinstance(v, os.PathLike) else [text(x) for x in v] if isinstance(v, list) else v

        return {k: text(v) for k, v in values.items()}

    def fields(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in type(self).model_fields}


def flag_of(name: str, field=None) -> str:
    return (field is not None and _extra(field)["flag"]) or "--" + name.replace("_", "-")


def build(model: type[Options], values: dict[str, Any], *, flags: bool = False) -> Options:
    """``model(**values)``, with a validation failure turned into an ``OptionsError`` that names the option (as a
    flag when ``flags``) and what it accepts."""
    try:
        return model(**values)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            name = str(e["loc"][0]) if e["loc"] else "?"
            field = model.model_fields.get(name)
            shown = name if not flags or field is None or _extra(field)["positional"] else flag_of(name, field)
            if e["type"] == "extra_forbidden":
                valid = ", ".join(model.model_fields)
                problems.append(f"unknown option {name!r} (valid: {valid})")
            else:
                given = e.get("input")
                value = f"{shown} {given}" if shown.startswith("--") else f"{shown}={given!r}"
                problems.append(f"{value}: {e['msg']}".replace("Value error, ", ""))
        raise OptionsError("; ".join(problems)) from None


def takes(model: type[Options], *, extra_into: str | None = None):
    """Make ``fn`` take ``model``'s fields. Positional arguments fill the command line's positional fields, then
    the others in their declared order; keyword arguments the rest. Everything is validated by the model, then ``fn``
    is called with every field. With ``extra_into``, keyword arguments that are not fields are collected into that
    dict field (method parameters). A model instance alone is taken as it is."""
    fields = model.model_fields
    order = [n for n, f in fields.items() if _extra(f)["positional"]] + [
        n for n, f in fields.items() if not _extra(f)["positional"]
    ]

    def wrap(fn):
        names = set(inspect.signature(fn).parameters)
        if names != set(fields):
            raise TypeError(f"{fn.__name__} takes {sorted(names)}, but {model.__name__} declares {sorted(fields)}")

        @functools.wraps(fn)
        def call(*args, **kwargs):
            if len(args) == 1 and not kwargs and isinstance(args[0], model):
                return fn(**args[0].fields())
            if len(args) > len(order):
                raise TypeError(f"{fn.__name__} takes at most {len(order)} positional arguments")
            values = dict(zip(order, args, strict=False))
            if extra_into is not None:
                values[extra_into] = {k: kwargs.pop(k) for k in list(kwargs) if k not in model.model_fields}
            values.update(kwargs)
            return fn(**build(model, values).fields())

        call.options = model
        return call

    return wrap


def _extra(field) -> dict:
    return {"positional": False, "metavar": None, "flag": None, **(field.json_schema_extra or {})}


def _unwrap(annotation: Any) -> Any:
    """The annotation without ``| None``."""
    if get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _range_text(field) -> str:
    words = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    parts = []
    for meta in field.metadata:
        for key, sign in words.items():
            value = getattr(meta, key, None)
            if value is not None:
                parts.append(f"{sign} {value}")
    return ", ".join(parts)


def add_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, model: type[Options], skip: tuple[str, ...] = ()
) -> None:
    """One argparse argument per field of ``model`` (except ``skip``). Defaults stay in the model: an option not
    given on the command line is not passed, so the model's default applies."""
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        extra = _extra(field)
        annotation = _unwrap(field.annotation)
        origin = get_origin(annotation)
        kw: dict[str, Any] = {"help": _help(field), "default": argparse.SUPPRESS}
        if extra["metavar"]:
            kw["metavar"] = extra["metavar"]
        if origin is Literal:
            kw["choices"] = list(get_args(annotation))
        if extra["positional"]:
            kw.pop("default")
            if origin is list or annotation is list:
                kw["nargs"] = "+" if field.is_required() else "*"
            parser.add_argument(name, **kw)
            continue
        if annotation is bool:
            kw["action"] = "store_true"
        elif field.is_required():
            kw["required"] = True
            kw.pop("default")
        parser.add_argument(flag_of(name, field), dest=name, **kw)


def _help(field) -> str:
    text = field.description or ""
    annotation = _unwrap(field.annotation)
    if not field.is_required() and annotation is not bool and field.default not in (None, [], ()):
        default = field.default
        if isinstance(default, list):
            default = ",".join(map(str, default))
        if f"default {default}" not in text:
            text += f" (default {default})"
    bounds = _range_text(field)
    if bounds:
        text += f" [{bounds}]"
    return text.replace("%", "%%")


def from_namespace(model: type[Options], ns: argparse.Namespace, **more: Any) -> Options:
    """The model from the options argparse saw (absent ones take the model's defaults) and ``more``."""
    values = {n: getattr(ns, n) for n in model.model_fields if hasattr(ns, n)}
    values.update(more)
    return build(model, values, flags=True)
