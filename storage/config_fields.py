"""Config field types the build and run configs share (tasks/config.py, model/train_config.py).

Pydantic's lax mode would take `seed: true` as 1, `seed: "7"` as 7 and `lr: true` as 1.0; these
types refuse the coercions that hide a mistake. A float still takes a string such as "4e-4",
which YAML 1.1 (PyYAML) reads as a string, not a number.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BeforeValidator, Field

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
