"""``python -m llm_otel_callbacks <command>``: check a config offline, and more.

Each command lives in its own module and registers a ``(add_arguments, run)`` pair here.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from .cli_check import add_arguments as _check_args
from .cli_check import run as _check_run

AddArguments = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]
Command = tuple[str, str, AddArguments, Run]


def _commands() -> list[Command]:
    commands: list[Command] = [
        ("check", "validate callback configs in a Ray Serve YAML file, offline",
         _check_args, _check_run),
    ]
    try:  # optional commands whose modules may pull heavier imports
        from .demo.app import add_arguments as demo_args
        from .demo.app import run as demo_run

        commands.append(("demo", "run the end-to-end demo on an embedded default",
                         demo_args, demo_run))
    except ImportError:
        pass
    try:
        from .dashboards import add_arguments as dash_args
        from .dashboards import run as dash_run

        commands.append(("dashboards", "regenerate the Grafana dashboards", dash_args, dash_run))
    except ImportError:
        pass
    from .alerts import add_arguments as alert_args
    from .alerts import run as alert_run

    commands.append(("alerts", "regenerate the Prometheus alerting rules (or write custom ones)",
                     alert_args, alert_run))
    return commands


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm_otel_callbacks")
    sub = parser.add_subparsers(dest="command", required=True)
    runners: dict[str, Callable[[argparse.Namespace], int]] = {}
    for name, help_text, add_args, run in _commands():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
        runners[name] = run
    args = parser.parse_args(argv)
    return runners[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
