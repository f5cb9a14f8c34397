"""A pydantic `ValidationError` as one readable line: the key path of its first error and a
message that never quotes a secret's value. For every YAML file read through a pydantic
model (the main config, the web config), so that their messages read alike.

A model may name, in a class variable `REFUSED`, keys it knows but refuses (a format's key
this implementation does not honour); they are left out of the "expected one of" hint.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from typing import Any

import pydantic

from exporter.config.errors import Path, shown

TYPE_WORDS = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "bool_type": "true or false",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "float_type": "a number",
}


def first_problem(
    err: pydantic.ValidationError,
    root: type[pydantic.BaseModel],
    is_secret: Callable[[Path], bool],
) -> tuple[Path, str]:
    """The key path and message of the first error of `err`, raised validating `root`."""
    error = err.errors(include_url=False)[0]
    loc: Path = tuple(error["loc"])
    if loc and loc[-1] == "[key]":
        # A mapping key failed (not its value): name the key as the file spells it, or
        # its mapping when it is empty.
        key = str(loc[-2])
        path = (*loc[:-2], key) if key else loc[:-2]
        kind = error["type"]
        if kind in TYPE_WORDS:
            return path, f"expected {TYPE_WORDS[kind]} as a key, got {describe(error['input'])}"
        return path, _validator_message(error)
    return loc, message(error, root, is_secret(loc))


def message(error: Any, root: type[pydantic.BaseModel], secret: bool) -> str:
    kind = error["type"]
    value = error.get("input")
    if kind == "extra_forbidden":
        allowed = allowed_keys(root, tuple(error["loc"][:-1]))
        hint = f" (expected one of: {', '.join(allowed)})" if allowed else ""
        return f"unknown key{hint}"
    if kind == "missing":
        return "required key is missing"
    if kind in TYPE_WORDS:
        got = f"{kind_of(value)} (value not shown)" if secret else describe(value)
        return f"expected {TYPE_WORDS[kind]}, got {got}"
    return _validator_message(error)


def _validator_message(error: Any) -> str:
    # pydantic's own messages and our validators' never quote the input.
    return str(error["msg"]).removeprefix("Value error, ")


def kind_of(value: object) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def describe(value: object) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, dict | list):
        return kind_of(value)
    return f"{type(value).__name__} {shown(value)}"


def allowed_keys(root: type[pydantic.BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys a mapping at `loc` accepts, found by walking the model classes."""
    model: Any = root
    for part in loc:
        if isinstance(part, int):
            continue
        fields = model.model_fields
        name = next((n for n, f in fields.items() if (f.alias or n) == part), None)
        if name is None:
            return []
        model = _model_in(fields[name].annotation)
        if model is None:
            return []
    refused = getattr(model, "REFUSED", {})
    return [f.alias or n for n, f in model.model_fields.items() if n not in refused]


def _model_in(annotation: Any) -> type[pydantic.BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is not None:
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None
