"""docs/catalog.md's tables are generated from catalog.py; fail when they drift, and when the
README stops pointing a newcomer at them."""

from __future__ import annotations

from llm_otel_callbacks import _docs, catalog
from tests._support.ray_env import REPO_ROOT


def test_catalog_doc_is_generated_from_the_catalog() -> None:
    doc = (REPO_ROOT / _docs.DEFAULT_PATH).read_text()
    assert _docs.block() in doc, "run: python -m llm_otel_callbacks._docs"
    for spec in catalog.ALL_METRICS:
        assert spec.exposed_name(ray=True) in doc


def test_readme_links_every_doc_and_keeps_its_two_commands() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    assert "./demo.sh" in readme and "./test.sh" in readme
    for doc in sorted((REPO_ROOT / "docs").glob("*.md")):
        assert f"(docs/{doc.name})" in readme, f"README does not link docs/{doc.name}"
    assert len(readme.splitlines()) <= 220, "keep the README short: details go to docs/"


def test_claims_in_the_docs_match_what_the_tests_prove() -> None:
    """README and docs claims of issue 14: a Security section; reliability figures labelled
    as measured once (the tests assert properties, not the figures); no 'costs nothing' for
    a Composite, which opens a span for every dispatch."""
    readme = (REPO_ROOT / "README.md").read_text()
    security = readme.split("## Security", 1)[1].split("\n## ", 1)[0]
    for topic in ("never leaves the process", "Ports", "check", "Rate-limit keys",
                  "127.0.0.1", "trusted configs only", "gateway"):
        assert topic in security, topic
    reliability = (REPO_ROOT / "docs" / "reliability.md").read_text()
    assert "measured once, not asserted" in reliability
    assert "Every\nrow is a test that can fail" not in reliability
    composite = (REPO_ROOT / "docs" / "composite.md").read_text()
    assert "costs nothing" not in composite
    assert "still opens its own span" in composite
