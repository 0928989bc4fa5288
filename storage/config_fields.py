"""Config field types the build and run configs share (tasks/config.py, model/train_config.py).

Pydantic's lax mode would take `seed: true` as 1, `seed: "7"` as 7 and `lr: true` as 1.0; these
types refuse the coercions that hide a mistake. A float still takes a string such as "4e-4",
which YAML 1.1 (PyYAML) reads as a string, not a number.

Path-valued fields (`InputPath`, `OutputPath`) are read from the config file's folder when the file
is read (storage/config_file.py passes its folder in the validation context); a config made in
Python keeps its relative paths, read from the working folder.
"""

from __future__ import annotations

import os
import posixpath
import re
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator, Field, ValidationInfo, WithJsonSchema

from storage.store import NO_CREDENTIALS_PATTERN, check_uri_has_no_credentials

MAX_SEED = 2**32 - 1  # numpy's legacy seeding, xxhash and torch all take it
MAX_NAME_CHARS = 100  # a build, build id or source name: one key segment (255 bytes at most on most file systems)


def _not_a_bool(value: object) -> object:
    if isinstance(value, bool):
        raise ValueError("expected a number, not true/false")
    return value


Seed = Annotated[int, Field(strict=True, ge=0, le=MAX_SEED)]
Real = Annotated[float, BeforeValidator(_not_a_bool), Field(allow_inf_nan=False)]
# Strict versions of pydantic's types of the same names.
PositiveInt = Annotated[int, Field(strict=True, gt=0)]
NonNegativeInt = Annotated[int, Field(strict=True, ge=0)]
PositiveFloat = Annotated[Real, Field(gt=0)]
NonNegativeFloat = Annotated[Real, Field(ge=0)]


CONFIG_FOLDER = "config_folder"  # the validation context's key: the folder (path or URI) of the file read
_WILDCARD = re.compile(r"[*?[]")


def _config_folder(value: str, info: ValidationInfo) -> str | None:
    """The folder a relative path of a config file is read from; None for a URI, an absolute path
    (`~` included) or a config made in Python."""
    folder = (info.context or {}).get(CONFIG_FOLDER)
    if folder is None or "://" in value or os.path.isabs(os.path.expanduser(value)):
        return None
    return folder


def _joined(folder: str, path: str) -> str:
    scheme, sep, root = folder.rpartition("://")
    if sep:  # a config read from a store: s3://bucket/configs + ../x -> s3://bucket/x
        return f"{scheme}{sep}{posixpath.normpath(posixpath.join(root, path))}"
    return os.path.normpath(os.path.join(folder, path))


def _from_config_folder(value: str, info: ValidationInfo) -> str:
    folder = _config_folder(value, info)
    return value if folder is None else _joined(folder, value)


def _existing_input(value: str, info: ValidationInfo) -> str:
    """An input's path resolved from the config file's folder, refused if it is not there (a glob:
    its folder up to the first wildcard), naming the folder it was read from."""
    folder = _config_folder(value, info)
    if folder is None:
        return value
    resolved = _joined(folder, value)
    literal, *wildcard = _WILDCARD.split(resolved, maxsplit=1)
    if "://" not in resolved and not os.path.exists(os.path.dirname(literal) if wildcard else literal):
        raise ValueError(f"{resolved} does not exist ({value!r} is read from the config file's folder, {folder})")
    return resolved


# A path or URI the config reads (a file, a glob or a folder) or writes under. Credentials in a URI
# would be stored with the flow run's parameters: refused here, and by the schema's pattern on the
# Prefect server, which checks a deployment run's parameters before it stores them.
_STORE_URI_SCHEMA = WithJsonSchema({"type": "string", "minLength": 1, "pattern": NO_CREDENTIALS_PATTERN})
InputPath = Annotated[
    str, Field(min_length=1), AfterValidator(check_uri_has_no_credentials), AfterValidator(_existing_input),
    _STORE_URI_SCHEMA,
]
OutputPath = Annotated[
    str, Field(min_length=1), AfterValidator(check_uri_has_no_credentials), AfterValidator(_from_config_folder),
    _STORE_URI_SCHEMA,
]
