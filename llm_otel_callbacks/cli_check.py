"""``check CONFIG.yaml``: validate every callback_config a Ray Serve config file holds.

Accepts a Ray Serve config (``applications[].args.llm_configs[].callback_config``, where an
``llm_configs`` entry may also be a path to a YAML file of one LLMConfig) or a bare
callback_config mapping. Exits 1 with pointed messages when anything is wrong, 2 when a file
cannot be read; never with a traceback.

It imports every module the config names and constructs the callbacks, as Ray would, so run it
on trusted configs only. Telemetry is forced off meanwhile: nothing is exported, no traces file
is written, no port is opened, whatever the config's ``telemetry`` says.
"""

from __future__ import annotations

import argparse
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from ._validation import CallbackConfigError, clip
from .config import validate_callback_config
from .telemetry.settings import telemetry_forced_off

#: Largest YAML file read (a Serve config is a few KiB; /dev/zero must not fill memory).
MAX_FILE_BYTES = 4 * 1024 * 1024


class _FileError(Exception):
    """A file that cannot be read as YAML; the message says why."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="Ray Serve config YAML, or a callback_config")


def read_yaml(path: Path) -> Any:
    """The YAML document in ``path``: a regular file under :data:`MAX_FILE_BYTES`, UTF-8,
    plain YAML (``safe_load``: no ``!!python`` tags). Raises :class:`_FileError`."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused just below.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise _FileError(f"cannot open: {exc.strerror or exc}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise _FileError("not a regular file")
        data = os.read(fd, MAX_FILE_BYTES + 1)
        while len(data) <= MAX_FILE_BYTES and (more := os.read(fd, MAX_FILE_BYTES + 1)):
            data += more
    except OSError as exc:
        raise _FileError(f"cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_BYTES:
        raise _FileError(f"larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _FileError(f"not UTF-8 text (byte {exc.start})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise _FileError(f"not valid YAML: {clip(str(exc), 300)}") from None


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
        if not isinstance(llm_configs, list):
            raise CallbackConfigError(
                f"applications[{clip(str(app_name))}].args.llm_configs: must be a list"
            )
        for l_index, entry in enumerate(llm_configs):
            where = f"applications[{clip(str(app_name))}].args.llm_configs[{l_index}]"
            if isinstance(entry, str):
                path = base_dir / entry
                try:
                    entry = read_yaml(path)
                except _FileError as exc:
                    raise CallbackConfigError(f"{where}: {clip(str(path))}: {exc}") from None
            if isinstance(entry, dict) and entry.get("callback_config") is not None:
                yield f"{where}.callback_config", entry["callback_config"]


def run(args: argparse.Namespace) -> int:
    path: Path = args.config
    try:
        doc = read_yaml(path)
    except _FileError as exc:
        print(f"FAIL {path}: {exc}")
        return 2
    with telemetry_forced_off():
        return _check_all(doc, path)


def _check_all(doc: Any, path: Path) -> int:
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
            except Exception as exc:  # whatever the named code does: a message, no traceback
                failures += 1
                print(f"FAIL {where}: {type(exc).__name__}: {clip(str(exc), 500)}")
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
