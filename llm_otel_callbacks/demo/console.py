"""Numbered steps for the demo's terminal output; long steps tick with the elapsed time."""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from collections.abc import Iterator
from typing import TextIO


class Console:
    """Where the demo writes: plain lines, headings, and numbered steps."""

    def __init__(self, out: TextIO, steps: int) -> None:
        self.out = out
        self.steps = steps
        self.done = 0
        self.tty = bool(getattr(out, "isatty", lambda: False)())
        encoding = (getattr(out, "encoding", None) or "").lower().replace("-", "")
        self.unicode = encoding.startswith("utf")
        self.width = max(80, min(140, shutil.get_terminal_size((110, 24)).columns))

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def heading(self, text: str) -> None:
        self.say()
        self.say(text)
        self.say("-" * min(len(text), self.width))

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[Step]:
        self.done += 1
        step = Step(self, f"[{self.done}/{self.steps}] {title}")
        step.begin()
        try:
            yield step
        except BaseException:
            step.end("failed")
            raise
        step.end(step.result or "done")


class Step:
    """One numbered step; long ones tick with the elapsed time and a status note."""

    def __init__(self, console: Console, title: str) -> None:
        self.console = console
        self.title = title
        self.note = ""
        self.result = ""
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._tick, daemon=True, name="demo-progress")

    def begin(self) -> None:
        if self.console.tty:
            self.console.out.write(f"{self.title} ...")
            self.console.out.flush()
        else:
            self.console.say(f"{self.title} ...")
        self._thread.start()

    def _line(self) -> str:
        elapsed = time.monotonic() - self._t0
        note = f" {self.note}" if self.note else ""
        return f"{self.title} ... {elapsed:4.0f}s{note}"

    def _tick(self) -> None:
        last_print = time.monotonic()
        while not self._stop.wait(1.0):
            if self.console.tty:
                line = self._line()[: self.console.width - 1]
                self.console.out.write("\r\x1b[K" + line)
                self.console.out.flush()
            elif time.monotonic() - last_print >= 15:
                last_print = time.monotonic()
                self.console.say("    " + self._line())

    def end(self, result: str) -> None:
        self._stop.set()
        self._thread.join()
        elapsed = time.monotonic() - self._t0
        if self.console.tty:
            self.console.out.write("\r\x1b[K")
        self.console.say(f"{self.title} ... {result} ({elapsed:.1f}s)")
