"""``check CONFIG.yaml``: validate every callback_config a Ray Serve config file holds.

Accepts a Ray Serve config (``applications[].args.llm_configs[].callback_config``, where an
``llm_configs`` entry may also be a path to a YAML file of one LLMConfig) or a bare
callback_config mapping. Exits 1 with pointed messages when anything is wrong.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from ._validation import CallbackConfigError
from .config import validate_callback_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="Ray Serve config YAML, or a callback_config")


def find_callback_configs(doc: Any, base_dir: Path) -> Iterator[tuple[str, Any]]:
    """(where, callback_config) for every callback_config in the document."""
    if isinstance(doc, dict) and "callback_class" in doc:
        yield "callback_config", doc
        return
    if isinstance(doc, dict) and "callback_config" in doc:
        yield "callback_config", doc["callback_config"]
        return
    apps = doc.get("applications") if isinstance(doc, dict) else None
    if not isinstance(apps, list):
        raise CallbackConfigError(
            "not a Ray Serve config (no 'applications' list) nor a callback_config "
            "(no 'callback_class')"
        )
    for a_index, app in enumerate(apps):
        app_name = app.get("name", a_index) if isinstance(app, dict) else a_index
        args = app.get("args", {}) if isinstance(app, dict) else {}
        llm_configs = args.get("llm_configs", []) if isinstance(args, dict) else []
        for l_index, entry in enumerate(llm_configs or []):
            where = f"applications[{app_name}].args.llm_configs[{l_index}]"
            if isinstance(entry, str):
                path = (base_dir / entry).resolve()
                try:
                    entry = yaml.safe_load(path.read_text())
                except OSError as exc:
                    raise CallbackConfigError(f"{where}: cannot read {path}: {exc}") from None
            if isinstance(entry, dict) and entry.get("callback_config") is not None:
                yield f"{where}.callback_config", entry["callback_config"]


def run(args: argparse.Namespace) -> int:
    path: Path = args.config
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        print(f"FAIL {path}: cannot load YAML: {exc}")
        return 2
    failures = 0
    found = 0
    try:
        for where, config in find_callback_configs(doc, path.parent):
            found += 1
            try:
                callback = validate_callback_config(config)
            except CallbackConfigError as exc:
                failures += 1
                print(f"FAIL {where}:\n  " + str(exc).replace("\n", "\n  "))
                continue
            children = getattr(callback, "children", None)
            detail = f" ({len(children)} children: {', '.join(c.name for c in children)})" \
                if children is not None else ""
            print(f"OK   {where}: {type(callback).__qualname__}{detail}; imports resolve, "
                  "kwargs valid, pickles")
    except CallbackConfigError as exc:
        print(f"FAIL {path}: {exc}")
        return 1
    if found == 0:
        print(f"FAIL {path}: no callback_config found")
        return 1
    return 1 if failures else 0
