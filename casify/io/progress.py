"""Progress that reads well where it is written: a tqdm bar on a terminal, and in a non-interactive log (CI, ``nohup``,
a cluster job's output file) one plain line every N steps instead of a carriage-return flood that a log viewer shows
as one endless line.

``CASIFY_PROGRESS=lines`` or ``=bar`` forces either form.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Iterable, Optional, TextIO

ENV = "CASIFY_PROGRESS"


def interactive(stream: Optional[TextIO] = None) -> bool:
    """Whether progress goes to a terminal (``CASIFY_PROGRESS`` overrides)."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in ("lines", "bar"):
        return forced == "bar"
    stream = stream if stream is not None else sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class LineProgress:
    """tqdm's interface (iterate, ``update``, ``set_postfix``, ``close``) printing ``desc: 40/200 (20%) 12.3 s,
    3.25 it/s, eta 49 s | loss=0.512`` every ``every`` steps and at the end."""

    def __init__(self, iterable: Optional[Iterable] = None, total: Optional[int] = None, desc: str = "",
                 every: int = 1, initial: int = 0, stream: Optional[TextIO] = None, disable: bool = False):
        self.iterable, self.desc, self.every = iterable, desc, max(1, int(every))
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n, self.start_n = total, int(initial), int(initial)
        self.stream = stream if stream is not None else sys.stderr
        self.disable, self.postfix, self.printed = disable, "", int(initial)
        self.start = time.perf_counter()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __len__(self) -> int:
        return self.total or 0

    def set_postfix(self, **kwargs) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in kwargs.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n - self.printed >= self.every:
            self._print()

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        text = f"{self.desc}: {self.n}" + (f"/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else "")
        text += f" {elapsed:.1f} s, {rate:.3g} it/s"
        if self.total and rate > 0:
            text += f", eta {(self.total - self.n) / rate:.0f} s"
        return text + (f" | {self.postfix}" if self.postfix else "")

    def _print(self) -> None:
        self.printed = self.n
        if not self.disable:
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self.n != self.printed:
            self._print()


def progress_bar(iterable: Optional[Iterable] = None, *, total: Optional[int] = None, desc: str = "",
                 disable: bool = False, every: Optional[int] = None, initial: int = 0, leave: bool = True,
                 stream: Optional[TextIO] = None, **tqdm_kwargs):
    """A tqdm bar on a terminal, else a :class:`LineProgress` that prints every ``every`` steps (default: about
    every 10 % of ``total``; a loop of 10 steps or fewer prints once, at its end)."""
    if not disable and not interactive(stream):
        size = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        step = every if every is not None else (max(1, size // 10) if size and size > 10 else max(size or 1, 1))
        return LineProgress(iterable, total=total, desc=desc, every=step, initial=initial, stream=stream)
    from tqdm.auto import tqdm
    return tqdm(iterable, total=total, desc=desc, disable=disable, initial=initial, leave=leave, file=stream,
                **tqdm_kwargs)


__all__ = ["ENV", "LineProgress", "interactive", "progress_bar"]
