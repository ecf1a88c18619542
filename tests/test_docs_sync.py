"""The README's catalog tables are generated from catalog.py; fail when they drift."""

from __future__ import annotations

from llm_otel_callbacks import _docs, catalog
from tests._support.ray_env import REPO_ROOT


def test_readme_catalog_is_generated_from_the_catalog() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    assert _docs.block() in readme, "run: python -m llm_otel_callbacks._docs README.md"
    for spec in catalog.ALL_METRICS:
        assert spec.exposed_name(ray=True) in readme
