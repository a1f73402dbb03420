"""Packaging: `cli/` and `schemas/` install inside the kdstore namespace; no top-level `cli` package."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_no_top_level_cli_package_is_installed() -> None:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))
    tool = cfg["tool"]["setuptools"]
    assert all(p == "kdstore" or p.startswith("kdstore.") for p in tool["packages"])
    assert tool["package-dir"]["kdstore.cli"] == "cli"
    assert tool["package-dir"]["kdstore.schemas"] == "schemas"
    assert cfg["project"]["scripts"]["kdstore"] == "kdstore.cli:main"
    assert "*.json" in tool["package-data"]["kdstore.schemas"]


def test_installed_command_group_and_schema() -> None:
    import kdstore.cli
    from kdstore.store import manifest

    assert Path(kdstore.cli.__file__).parent.name == "cli"
    assert manifest.schema(1)["properties"]["format_version"] == {"const": 1}


def test_store_layer_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, kdstore.store, kdstore.store.manifest, kdstore.store.remote, kdstore.store.catalog, "
            "kdstore.options, kdstore.plan, kdstore.cli; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
