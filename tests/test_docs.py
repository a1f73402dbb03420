"""The documentation's examples stay true: the manifest in docs/format.md validates against the schema."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema

from kdstore.store import manifest

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_format_md_manifest_example_is_valid() -> None:
    text = (DOCS / "format.md").read_text("utf-8")
    blocks = [b.split("\n```")[0] for b in text.split("```json\n")[1:]]
    blocks = [b for b in blocks if b.lstrip().startswith("{") and "\"format_version\"" in b]  # whole manifests
    assert blocks, "docs/format.md has no ```json example"
    for block in blocks:
        example = json.loads(block)
        jsonschema.validate(example, manifest.schema(example["format_version"]))
        manifest.validate(example, "docs/format.md example")
        assert example["format_version"] == manifest.FORMAT_VERSION  # the page shows the current format


def test_schema_files_are_the_packaged_schemas() -> None:
    for version in manifest.SUPPORTED_FORMAT_VERSIONS:
        repo_schema = json.loads((DOCS.parent / "schemas" / f"manifest.v{version}.json").read_text("utf-8"))
        assert repo_schema == manifest.schema(version)
        jsonschema.Draft202012Validator.check_schema(repo_schema)


def test_cli_md_is_current(capsys) -> None:  # type: ignore[no-untyped-def]
    """docs/cli.md is generated from --help; regenerate with `python scripts/gen_cli_docs.py > docs/cli.md`."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_cli_docs", DOCS.parent / "scripts" / "gen_cli_docs.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main_()
    assert capsys.readouterr().out == (DOCS / "cli.md").read_text("utf-8"), (
        "docs/cli.md is stale: run `python scripts/gen_cli_docs.py > docs/cli.md`")
