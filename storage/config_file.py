"""Reading a config file: the one loader of the build config, the run config and the CLI.

    typo.yaml: sources.1.text_feild: unknown key (did you mean 'text_field'?)

A config that cannot be read or does not validate raises ConfigError, one line per problem:
`<file>: <key path>: <problem>` (the CLI prints each after `error: `); a missing file raises
ObjectNotFound. Relative paths in the file are read from the file's folder, not the working folder
(storage/config_fields.py: InputPath, OutputPath), so a config means the same wherever the command
runs; a config read from a store URI resolves them against its folder there.
"""

from __future__ import annotations

import difflib
import os
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from storage.config_fields import CONFIG_FOLDER
from storage.store import ObjectNotFound, StoreError, open_object

Model = typing.TypeVar("Model", bound=BaseModel)


class ConfigError(ValueError):
    """A config file that cannot be read or does not validate; the message names the file and the key."""


def read_config(path_or_uri: str | os.PathLike, model: type[Model], updates: dict | None = None) -> Model:
    """`model` validated from the YAML (or JSON) file at a local path or store URI, with `updates` on
    top; relative paths in it (and in `updates`) resolved from the file's folder."""
    name = os.fspath(path_or_uri)
    text, folder = _read(name)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{name}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: expected a mapping of config keys, got {type(data).__name__}")
    try:
        return model.model_validate({**data, **(updates or {})}, context={CONFIG_FOLDER: folder})
    except ValidationError as e:
        raise ConfigError(describe_validation_error(name, e, model)) from None


def _read(name: str) -> tuple[str, str]:
    """The file's text and its folder (a local path, or the store URI of a remote file's folder).
    A missing file stays an ObjectNotFound (a node of a multi-node run may lack it: model/reach.py)."""
    if "://" not in name:
        path = Path(name).expanduser()
        try:
            return path.read_text(), os.path.dirname(os.path.abspath(path))
        except FileNotFoundError as e:
            raise ObjectNotFound(f"{name}: {e.strerror}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{name}: {getattr(e, 'strerror', None) or e}") from None
    try:
        store, key = open_object(name)
        local = store.local_path(key)
        return store.get_text(key), str(local.parent) if local else store.uri
    except ObjectNotFound:
        raise ObjectNotFound(f"{name}: no such object") from None
    except (StoreError, UnicodeDecodeError) as e:
        raise ConfigError(f"{name}: {e}") from None


def describe_validation_error(name: str, error: ValidationError, model: type[BaseModel]) -> str:
    """One line per problem: `<file>: <key.path>: <what>`; an unknown key with the closest known one."""
    lines = []
    for problem in error.errors():
        location, _ = _walk(model, problem["loc"])
        if problem["type"] == "extra_forbidden":
            _, parent = _walk(model, problem["loc"][:-1])
            known = sorted({key for section in _models_in(parent) for key in section.model_fields})
            close = difflib.get_close_matches(str(problem["loc"][-1]), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known keys: {', '.join(known)})"
            what = f"unknown key{hint}"
        else:
            what = problem["msg"].removeprefix("Value error, ")
        lines.append(f"{name}: {location}: {what}" if location else f"{name}: {what}")
    return "\n".join(lines)


def _walk(model: type[BaseModel], location: tuple) -> tuple[str, typing.Any]:
    """An error location's key path as the file spells it, and the type at its end. Pydantic names
    the member of a tagged union in the location (`launcher.torchrun.nproc`): the file does not."""
    keys: list[str] = []
    current: typing.Any = model
    for part in location:
        sections = _models_in(current)
        if isinstance(part, str) and (owner := next((m for m in sections if part in m.model_fields), None)):
            current = owner.model_fields[part].annotation
        elif isinstance(part, str) and (member := next((m for m in sections if _tagged(m, part)), None)):
            current = member
            continue
        keys.append(str(part))  # a key, a list index or dict key (the element type is found next time)
    return ".".join(keys), current


def _tagged(section: type[BaseModel], tag: str) -> bool:
    """Whether `section` is the member of a tagged union that `tag` names (its `kind: Literal[tag]`)."""
    return any(
        typing.get_origin(field.annotation) is typing.Literal and tag in typing.get_args(field.annotation)
        for field in section.model_fields.values()
    )


def _models_in(annotation: typing.Any) -> list[type[BaseModel]]:
    """The sections a field's type holds: itself, or inside an Optional, a union, a list or a dict's values."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for argument in typing.get_args(annotation) for model in _models_in(argument)]
