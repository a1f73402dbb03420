"""The documentation's examples stay true: the manifest in docs/format.md validates against the schema."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema

from kdstore import manifest

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_format_md_manifest_example_is_valid() -> None:
    text = (DOCS / "format.md").read_text("utf-8")
    blocks = [b.split("\n```")[0] for b in text.split("```json\n")[1:]]
    blocks = [b for b in blocks if b.lstrip().startswith("{") and "\"format_version\"" in b]  # whole manifests
    assert blocks, "docs/format.md has no ```json example"
    for block in blocks:
        example = json.loads(block)
        jsonschema.validate(example, manifest.schema(1))
        manifest.validate(example, "docs/format.md example")


def test_schema_file_is_the_packaged_schema() -> None:
    repo_schema = json.loads((DOCS.parent / "schemas" / "manifest.v1.json").read_text("utf-8"))
    assert repo_schema == manifest.schema(1)
    jsonschema.Draft202012Validator.check_schema(repo_schema)
