"""Errors for people: what the CLI prints instead of a traceback, and its exit codes.

    error: build.yaml: sources.0.globb: unknown key (did you mean 'glob'?)

Bad input (a config that does not validate, a YAML file that does not parse, a missing file, a
ValueError of the pipeline: these fail the same way every time) exits 2; any other failure 1;
an interrupt 130. `--debug` (or TINYLLAMA_DEBUG=1) prints the traceback as well.
"""

from __future__ import annotations

import difflib
import os
import types
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

DEBUG_ENV = "TINYLLAMA_DEBUG"
BAD_INPUT, FAILURE, INTERRUPTED = 2, 1, 130
MAX_MESSAGE_LINES = 6


class Interrupted(Exception):
    """Ctrl-C or SIGTERM ended the command after its clean-up; the message says what was done."""


class BadInput(ValueError):
    """Input the user can fix; the message names the file and what is wrong with it."""


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no")


def read_config(path: Path, model: type[BaseModel], updates: dict | None = None) -> BaseModel:
    """`model` validated from the YAML file at `path` (with `updates` on top); BadInput naming the
    file, the key path and, for an unknown key, the closest known one."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise BadInput(f"{path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise BadInput(f"{path}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, dict):
        raise BadInput(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    try:
        return model.model_validate({**data, **(updates or {})})
    except ValidationError as e:
        raise BadInput(describe_validation_error(path, e, model)) from None


def describe_validation_error(path: Path | str, error: ValidationError, model: type[BaseModel]) -> str:
    """One line per problem (at most a few): `<file>: <key.path>: <what>`."""
    lines = []
    for problem in error.errors():
        location = ".".join(str(part) for part in problem["loc"])
        if problem["type"] == "extra_forbidden":
            known = _known_keys(model, problem["loc"][:-1])
            close = difflib.get_close_matches(str(problem["loc"][-1]), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(sorted(known))})"
            what = f"unknown key{hint}"
        else:
            what = problem["msg"].removeprefix("Value error, ")
        lines.append(f"{path}: {location}: {what}" if location else f"{path}: {what}")
    if len(lines) > MAX_MESSAGE_LINES:
        lines = lines[:MAX_MESSAGE_LINES] + [f"... and {len(lines) - MAX_MESSAGE_LINES} more"]
    return "\n".join(lines)


def _known_keys(model: type[BaseModel], location: tuple) -> list[str]:
    """The field names of the (nested) model at `location`, following lists, dicts and Optionals."""
    current: typing.Any = model
    for part in location:
        current = _model_in(current)
        if current is None:
            return []
        if isinstance(part, str) and part in current.model_fields:
            current = current.model_fields[part].annotation
        elif not isinstance(part, str):
            continue  # a list index or dict key: the element type is found by _model_in
        else:
            return []
    current = _model_in(current)
    return list(current.model_fields) if current is not None else []


def _model_in(annotation: typing.Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list, dict, tuple) or origin is not None:
        for argument in reversed(typing.get_args(annotation)):  # dict[str, X]: the value type
            if (found := _model_in(argument)) is not None:
                return found
    return None


def exit_code(error: BaseException) -> int:
    return BAD_INPUT if isinstance(error, (ValueError, FileNotFoundError)) else FAILURE


def describe(error: BaseException) -> str:
    """The message the user sees for `error` (without the `error: ` prefix): its own text, or its
    cause's when it wraps one (a Ray task's error carries the remote traceback)."""
    cause = getattr(error, "cause", None)  # ray.exceptions.RayTaskError
    if isinstance(cause, BaseException):
        error = cause
    text = str(error).strip() or type(error).__name__
    lines = text.splitlines()
    if len(lines) > MAX_MESSAGE_LINES:
        lines = lines[:MAX_MESSAGE_LINES] + [f"... ({len(lines) - MAX_MESSAGE_LINES} more lines; --debug shows all)"]
    return "\n".join(lines)
