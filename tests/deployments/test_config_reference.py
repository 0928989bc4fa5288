"""docs/configuration.md is what the generator renders from the config models; the rendering has a
row for every key of every nested section (found here through the models' JSON schema), and a
row says the key's type, bounds, default and description."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import pytest
from pydantic import AfterValidator, BaseModel, Field, PositiveFloat

from deployments.config_reference import COMMAND, config_section, render
from model.train_config import TrainConfig
from storage.store import check_uri_has_no_credentials
from tasks.config import BuildConfig

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_the_configuration_reference_is_up_to_date():
    assert DOC.read_text() == render(), f"docs/configuration.md differs from the config models: run `{COMMAND}`"


def schema_keys(node: dict, defs: dict, path: str = "") -> set[str]:
    """Every key path of a JSON schema node: `a.b` inside sections, `a[]` for a list's entries."""
    if "$ref" in node:
        return schema_keys(defs[node["$ref"].rsplit("/", 1)[1]], defs, path)
    keys = set()
    for variant in node.get("anyOf", []) + node.get("oneOf", []):
        keys |= schema_keys(variant, defs, path)
    if "items" in node and isinstance(node["items"], dict):
        keys |= schema_keys(node["items"], defs, path + "[]")
    for name, child in node.get("properties", {}).items():
        key = f"{path}.{name}" if path else name
        keys |= {key} | schema_keys(child, defs, key)
    return keys


@pytest.mark.parametrize(
    ("model", "nested_keys"),
    [(BuildConfig, {"sources[].text_field", "tokenizer.train.vocab_size"}), (TrainConfig, {"data[].weight", "launcher.max_failures"})],
)
def test_every_key_has_a_row(model, nested_keys):
    schema = model.model_json_schema()
    keys = schema_keys(schema, schema.get("$defs", {}))
    assert nested_keys <= keys  # the walk reaches into lists, sections and unions of sections
    rendered = render()
    assert [key for key in sorted(keys) if f"| `{key}` |" not in rendered] == []


Uri = Annotated[str, AfterValidator(check_uri_has_no_credentials)]


class Inner(BaseModel):
    """The inner section."""

    count: int = 3


class Example(BaseModel):
    budget: int = Field(1 << 30, ge=1 << 16, description="Bytes one task may hold")
    uri: Uri
    inner: Inner = Field(default_factory=Inner)
    items: list[Inner] = Field(min_length=1)
    ratio: PositiveFloat | None = None
    mode: Literal["fast", "exact"] = "exact"


def test_a_row_holds_type_bounds_default_and_description():
    lines = config_section("Example", Example, "An example.").splitlines()
    assert "| `budget` | integer (>= 65536 (2^16)) | `1073741824` (1 GiB) | Bytes one task may hold |" in lines
    assert "| `uri` | string (no credentials in it) | required |  |" in lines
    assert "| `inner` | [section `inner`](#inner) | `{}` |  |" in lines
    assert "| `items` | list of [section `items[]`](#items) (not empty) | required |  |" in lines
    assert '| `ratio` | number or null (> 0) | `null` |  |' in lines
    assert '| `mode` | "fast" or "exact" | `"exact"` |  |' in lines
    # each nested section follows with its heading, docstring and keys
    inner = lines.index("### `inner`")
    assert lines[inner + 2] == "The inner section." and "| `inner.count` | integer | `3` |  |" in lines[inner:]
    assert "| `items[].count` | integer | `3` |  |" in lines[lines.index("### `items[]`"):]
