"""Progress of the long steps (rounds, clients, evaluation, image checks, decoding, encoding) that suits where the
output goes.

On a terminal it is tqdm's bar. Into a file or a pipe (a cluster job's log, ``fedprompt fit ... > run.log 2>&1``) a
bar would write a carriage-return update many times a second; there each update is one plain line instead, at most one
every :data:`LINE_SECONDS` seconds (one per round for the rounds), plus one line when the step ends::

    fedprompt: encoding images (image tower): 384/1282 img (30 %), 31 s
    fedprompt: rounds: 3/10 (30 %), 95 s, loss=1.21, acc=0.552

:func:`tqdm` takes the arguments of ``tqdm.tqdm`` that fedprompt uses, so a module switches by its import alone.
Plain Python (tqdm only): no torch.
"""

from __future__ import annotations

import sys
import time

#: in line mode, at most one line per this many seconds (the last update of a step is always printed)
LINE_SECONDS = 15.0


def is_terminal(stream) -> bool:
    """Whether ``stream`` is an interactive terminal (where a bar that redraws itself belongs)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class LineProgress:
    """tqdm's interface (iterate, ``update``, ``set_postfix``, ``close``, ``with``) writing plain lines: at most one
    per ``interval`` seconds (0: one per update), and a last one at the end when any was written or the step took at
    least ``interval`` seconds."""

    def __init__(self, iterable=None, total: int | None = None, desc: str = "", unit: str = "it",
                 interval: float = LINE_SECONDS, file=None):
        self.iterable = iterable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.desc, self.unit, self.interval = desc, unit, interval
        self.file = file or sys.stderr
        self.n = 0
        self.postfix: dict = {}
        self.start = self.last = time.monotonic()
        self.printed = False
        self.closed = False

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __len__(self) -> int:
        return self.total or 0

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval and not (self.total and self.n >= self.total):
            self._line(now)

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        now = time.monotonic()
        if self.n and (self.printed or now - self.start >= self.interval):
            self._line(now)

    def _line(self, now: float) -> None:
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        unit = "" if self.unit == "it" else f" {self.unit}"
        share = f" ({100 * self.n / self.total:.0f} %)" if self.total else ""
        extra = "".join(f", {k}={v:.4g}" if isinstance(v, float) else f", {k}={v}" for k, v in self.postfix.items())
        print(f"fedprompt: {self.desc}: {done}{unit}{share}, {now - self.start:.0f} s{extra}", file=self.file,
              flush=True)
        self.last = now
        self.printed = True


def tqdm(iterable=None, total: int | None = None, desc: str = "", leave: bool = True, disable: bool | None = False,
         unit: str = "it", interval: float | None = None, **kwargs):
    """A progress bar on a terminal (``tqdm.auto.tqdm`` with these arguments), plain lines elsewhere
    (:class:`LineProgress`; ``interval``: seconds between lines, default :data:`LINE_SECONDS`), nothing when
    ``disable`` is true (``None``, tqdm's "only on a terminal", shows lines elsewhere too)."""
    from tqdm.auto import tqdm as bar

    if disable:
        return bar(iterable, total=total, disable=True)
    if is_terminal(kwargs.get("file") or sys.stderr) or "ipykernel" in sys.modules:  # a notebook draws its widget
        return bar(iterable, total=total, desc=desc, leave=leave, unit=unit, **kwargs)
    return LineProgress(iterable, total=total, desc=desc, unit=unit,
                        interval=LINE_SECONDS if interval is None else interval, file=kwargs.get("file"))
