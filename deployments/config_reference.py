"""The configuration reference, docs/configuration.md, rendered from the config models themselves:

    python -m deployments.config_reference > docs/configuration.md

Every key of the build config (tasks.config.BuildConfig) and of the run config
(model.train_config.TrainConfig), nested sections included, with its type, constraints, default
and description; then the model presets and the LlamaConfig fields `model_overrides` takes.
tests/deployments/test_config_reference.py fails when the file differs from this rendering, so a
field added to a model without re-rendering the file fails CI.
"""

from __future__ import annotations

import enum
import inspect
import json
import re
import types
import typing
from collections.abc import Iterator

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic.functional_validators import AfterValidator
from pydantic_core import PydanticUndefined

from model.config import PRESETS, LlamaConfig
from model.train_config import TrainConfig
from storage.store import NO_CREDENTIALS_PATTERN, check_uri_has_no_credentials
from tasks.config import BuildConfig

COMMAND = "python -m deployments.config_reference > docs/configuration.md"
NO_CREDENTIALS = "no credentials in it"
BOUNDS = (
    (annotated_types.Gt, ">", "gt"),
    (annotated_types.Ge, ">=", "ge"),
    (annotated_types.Lt, "<", "lt"),
    (annotated_types.Le, "<=", "le"),
)

HEADER = f"""# Configuration reference

Generated from the config models by `{COMMAND}`; do not edit by hand
(tests/deployments/test_config_reference.py checks that it matches the models).

A config is a YAML file. Unknown keys are refused with the closest known one
(`error: my.yaml: sources.0.text_feild: unknown key (did you mean 'text_field'?)`), before
Prefect, Ray or torch start. A key written `a.b` below is `b` inside the section `a`; `a[]` is
each entry of the list `a`. A URI is `file:///path` or `s3://bucket/prefix` (endpoint and
credentials come from the AWS environment, never from the URI: a URI holding credentials is refused).

A relative path in a config file (a source's `uri`, `output`, `tokenizer.model`, a `manifest`,
`init_from`, `eval.include_path`, `work_dir`; `output` when left out too) is read from the config
file's folder, not from the folder the command runs in: `../data` in `examples/train-demo.yaml` is the
repository's `data/`. Absolute paths and URIs are taken as written. An input that a relative path
names must exist (`error: <file>: <key>: <path> does not exist ('<as written>' is read from the config
file's folder, <folder>)`). A config made in Python rather than read from a file keeps relative paths
relative to the working folder.

Types are strict where coercion would hide a mistake: whole numbers and flags refuse other types
(`seed: true`, `seed: "7"`, `max_steps: 100.0` and `compile: 1` are errors, not coerced); decimal
numbers refuse `true`/`false`, `inf` and `nan` but accept what YAML reads as text, such as
`lr: {{max: 4e-4}}`. Every bound below (seeds 0 to 4294967295, names of at most 100 characters,
run names of at most 201, partition counts of at most 65536, ...) is checked when the file is
read: exit 2, one line per problem, `error: <file>: <key>: <what>`.

- [Build config](#build-config) (`tinyllama build-dataset CONFIG`, `tinyllama submit-build CONFIG`, `tinyllama serve --build-config`)
- [Run config](#run-config) (`tinyllama train CONFIG`, `tinyllama plan-train CONFIG`, `tinyllama serve --train-config`)
- [Model presets and `model_overrides`](#model-presets-and-model_overrides)
"""

BUILD_INTRO = """`tasks.config.BuildConfig`: the `build-dataset` flow's parameters (the Prefect UI renders the
same model as the deployment's form). Example: examples/build-my-data.yaml."""

RUN_INTRO = """`model.train_config.TrainConfig`: a training run. Steps are optimizer steps throughout (the lr
schedule too); a step consumes exactly `global_batch_tokens` tokens. `tinyllama serve
--train-config` takes the same YAML without `data` (the deployments train on their build).
Examples: examples/train-demo.yaml, examples/tinyllama-1.1b.yaml."""

PRESETS_INTRO = """`model` names a preset of `model.config.PRESETS`; `model_overrides` replaces any of its
`model.config.LlamaConfig` fields (`vocab_size` defaults to the datasets' tokenizer)."""


def render() -> str:
    """The whole reference, as markdown."""
    parts = [HEADER]
    parts.append(config_section("Build config", BuildConfig, BUILD_INTRO))
    parts.append(config_section("Run config", TrainConfig, RUN_INTRO))
    parts.append(_presets_section())
    return "\n".join(parts)


def config_section(title: str, model: type[BaseModel], intro: str) -> str:
    """A config's reference: a table of its keys, then one per nested section."""
    lines = [f"## {title}", "", intro, ""]
    for path, heading, nested in _sections(model, "", ""):
        if path:
            lines += [f"### {heading}", ""]
            if doc := _docstring(nested):
                lines += [doc, ""]
        lines += _table(nested, path)
    return "\n".join(lines)


def _sections(model: type[BaseModel], path: str, heading: str) -> Iterator[tuple[str, str, type[BaseModel]]]:
    """(key path, heading, model) of `model` and of every model nested in its fields, depth first."""
    yield path, heading, model
    for name, field in model.model_fields.items():
        nested = list(_models_in(field.annotation))
        for child, suffix in nested:
            key = f"{path}.{name}{suffix}" if path else f"{name}{suffix}"
            yield from _sections(child, key, _heading(key, child, len(nested)))


def _heading(key: str, model: type[BaseModel], variants: int) -> str:
    """A section's heading: its key path, and for a union of sections (the launcher) its `kind`."""
    return f"`{key}`" + (f" (`kind: {_kind(model)}`)" if variants > 1 else "")


def _anchor(heading: str) -> str:
    """The link target GitHub gives a heading."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def _models_in(annotation: typing.Any, suffix: str = "") -> Iterator[tuple[type[BaseModel], str]]:
    """The models a field holds, each with the suffix of its key path ('[]' for a list's entries)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation, suffix
        return
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        yield from _models_in(args[0], suffix)
    elif origin is list:
        yield from _models_in(args[0], suffix + "[]")
    elif origin in (typing.Union, types.UnionType):
        for argument in args:
            yield from _models_in(argument, suffix)


def _kind(model: type[BaseModel]) -> str:
    return typing.get_args(model.model_fields["kind"].annotation)[0]


def _docstring(model: type[BaseModel]) -> str:
    doc = model.__dict__.get("__doc__")  # its own, not a base class's
    return " ".join(inspect.cleandoc(doc).split()) if doc else ""


def _table(model: type[BaseModel], path: str, required: str = "required") -> list[str]:
    lines = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for name, field in model.model_fields.items():
        key = f"{path}.{name}" if path else name
        cells = [f"`{key}`", _type_cell(field, key), _default(field, required), field.description or ""]
        lines.append("| " + " | ".join(_escape(cell) for cell in cells) + " |")
    return lines + [""]


def _type_cell(field: FieldInfo, key: str) -> str:
    described = _describe_type(field.annotation, key)
    constraints = _constraints([*field.metadata, *_nested_metadata(field.annotation)], field.annotation)
    return described + (f" ({', '.join(constraints)})" if constraints else "")


def _describe_type(annotation: typing.Any, key: str) -> str:
    """A type in YAML's words; a nested section is named by its key path."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _describe_type(args[0], key)
    if origin in (typing.Union, types.UnionType):
        models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        if len(models) > 1:
            return "section, by `kind`: " + " or ".join(
                f"[`{_kind(m)}`](#{_anchor(_heading(key, m, len(models)))})" for m in models
            )
        described = [_describe_type(a, key) for a in args if a is not type(None)]
        return " or ".join(described) + (" or null" if type(None) in args else "")
    if origin is list:
        return f"list of {_describe_element(args[0], key + '[]')}"
    if origin is dict:
        return f"map of {_describe_element(args[0], key)} to {_describe_element(args[1], key)}"
    if origin is tuple:
        return "[" + ", ".join(_describe_element(a, key) for a in args) + "]"
    if origin is typing.Literal:
        return " or ".join(f'"{a}"' for a in args)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"[section `{key}`](#{_anchor(_heading(key, annotation, 1))})"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " or ".join(f'"{member.value}"' for member in annotation)
    return {str: "string", int: "integer", float: "number", bool: "boolean", typing.Any: "any"}.get(
        annotation, getattr(annotation, "__name__", str(annotation))
    )


def _describe_element(annotation: typing.Any, key: str) -> str:
    """An element's type inside a list, map or pair, with its own constraints."""
    constraints = _constraints(_nested_metadata(annotation), annotation)
    return _describe_type(annotation, key) + (f" ({', '.join(constraints)})" if constraints else "")


def _nested_metadata(annotation: typing.Any) -> list:
    """Constraints inside the type itself (`PositiveInt | None` keeps its `> 0` in an Annotated,
    possibly inside a `Field(...)`)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        found = [m for item in annotation.__metadata__ for m in (item.metadata if isinstance(item, FieldInfo) else [item])]
        return [*found, *_nested_metadata(args[0])]
    if origin in (typing.Union, types.UnionType):
        return [m for a in args for m in _nested_metadata(a)]
    return []


def _constraints(metadata: list, annotation: typing.Any) -> list[str]:
    found: list[str] = []
    for item in metadata:
        for text in _constraint(item, annotation):
            if text not in found:
                found.append(text)
    return found


def _constraint(item: typing.Any, annotation: typing.Any) -> list[str]:
    for kind, sign, attribute in BOUNDS:
        if isinstance(item, kind):
            return [f"{sign} {_bound(getattr(item, attribute))}"]
    unit = "characters" if _describe_type(annotation, "").startswith("string") else "entries"
    if isinstance(item, annotated_types.MinLen):
        return ["not empty"] if item.min_length == 1 else [f"at least {item.min_length} {unit}"]
    if isinstance(item, annotated_types.MaxLen):
        return [f"at most {item.max_length} {unit}"]
    if isinstance(item, AfterValidator) and item.func is check_uri_has_no_credentials:
        return [NO_CREDENTIALS]
    texts = []
    if (pattern := getattr(item, "pattern", None)) is not None:
        texts.append(NO_CREDENTIALS if pattern == NO_CREDENTIALS_PATTERN else f"matches `{pattern}`")
    if getattr(item, "allow_inf_nan", None) is False:
        texts.append("finite")
    schema = getattr(item, "json_schema", None)  # WithJsonSchema
    if isinstance(schema, dict) and schema.get("pattern") == NO_CREDENTIALS_PATTERN:
        texts.append(NO_CREDENTIALS)
    return texts


def _bound(value: int | float) -> str:
    if isinstance(value, int) and value >= 1 << 16 and value & (value - 1) == 0:
        return f"{value} (2^{value.bit_length() - 1})"
    return str(value)


def _default(field: FieldInfo, required: str) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return required
    else:
        value = field.default
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", exclude_defaults=True)
    elif isinstance(value, enum.Enum):
        value = value.value
    elif isinstance(value, tuple):
        value = list(value)
    text = f"`{json.dumps(value, separators=(', ', ': '))}`"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1 << 16:
        text += f" ({_size(value)})"
    return text


def _size(value: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if value >= 1 << shift and value % (1 << shift) == 0:
            return f"{value >> shift} {unit}"
    return f"{value:,}"


def _escape(cell: str) -> str:
    return cell.replace("|", "\\|").replace("\n", " ")


def _presets_section() -> str:
    fields = list(LlamaConfig.model_fields)
    lines = ["## Model presets and `model_overrides`", "", PRESETS_INTRO, ""]
    lines += ["| preset | " + " | ".join(fields) + " |", "| --- |" + " ---: |" * len(fields)]
    for name in PRESETS:
        config = LlamaConfig.preset(name)
        lines.append(f"| `{name}` | " + " | ".join(str(getattr(config, f)) for f in fields) + " |")
    lines += ["", "### `model_overrides`", ""]
    if doc := _docstring(LlamaConfig):
        lines += [doc, ""]
    lines += _table(LlamaConfig, "model_overrides", required="the preset's")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
