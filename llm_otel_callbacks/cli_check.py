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


#: ``server_cls`` of a bare callback_config: unknown (not checked).
UNKNOWN = object()
OBSERVED_SERVER = "llm_otel_callbacks.serve.ObservedLLMServer"


def find_callback_configs(doc: Any, base_dir: Path) -> Iterator[tuple[str, Any, Any]]:
    """(where, callback_config, server_cls) for every callback_config in the document
    (server_cls is :data:`UNKNOWN` for a bare callback_config)."""
    if isinstance(doc, dict) and "callback_class" in doc:
        yield "callback_config", doc, UNKNOWN
        return
    if isinstance(doc, dict) and "callback_config" in doc:
        yield "callback_config", doc["callback_config"], doc.get("server_cls")
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
                yield f"{where}.callback_config", entry["callback_config"], entry.get(
                    "server_cls"
                )


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
        for where, config, server_cls in find_callback_configs(doc, path.parent):
            found += 1
            try:
                callback = validate_callback_config(config)
                check_server(callback, server_cls)
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


def observed_server(server_cls: Any) -> bool:
    """Whether ``server_cls`` is ObservedLLMServer (or a subclass)."""
    if server_cls is None:
        return False
    if server_cls == OBSERVED_SERVER:
        return True
    target = server_cls
    if isinstance(server_cls, str):
        from .config import import_object

        try:
            target = import_object(server_cls)
        except ImportError:
            return False
    from .serve import ObservedLLMServer

    return isinstance(target, type) and issubclass(target, ObservedLLMServer)


def check_server(callback: Any, server_cls: Any) -> None:
    """Engine-start and request hooks run only under ObservedLLMServer: without it they
    would silently never run, so the check fails, naming the children and the fix."""
    if server_cls is UNKNOWN:
        return
    from ._startup_points import server_hooks

    needing = server_hooks(callback, phase_functions=False)
    if not needing:
        return
    if not observed_server(server_cls):
        raise CallbackConfigError(
            f"{'; '.join(needing)}: engine-start and request hooks only run with "
            f"server_cls: {OBSERVED_SERVER} in the LLMConfig (got "
            f"{server_cls or 'none'}); add it, or these hooks never run"
        )
