"""Progress on long work: a tqdm bar on a terminal, plain log lines otherwise (CI, --quiet)."""
from __future__ import annotations

import sys
import time
from typing import Any


class Progress:
    def __init__(self, name: str, total: int, unit: str = "it", *, quiet: bool = False, stream: Any = None):
        self.name, self.total, self.unit, self.quiet = name, total, unit, quiet
        self.stream = stream or sys.stderr
        self.done, self.t0, self._last_line = 0, time.perf_counter(), 0.0
        self._bar = None
        if not quiet and getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=name, unit=unit, file=self.stream, dynamic_ncols=True)

    def update_to(self, done: int, **postfix: Any) -> None:
        step, self.done = done - self.done, done
        if self._bar is not None:
            self._bar.update(step)
            if postfix:
                self._bar.set_postfix({k: _fmt(v) for k, v in postfix.items()}, refresh=False)
            return
        if self.quiet:
            return
        now = time.perf_counter()
        if done < self.total and now - self._last_line < 5.0 and done != 1:
            return  # one line every few seconds keeps CI logs readable
        self._last_line = now
        elapsed = now - self.t0
        eta = elapsed / done * (self.total - done) if done else 0.0
        extra = "".join(f" {k}={_fmt(v)}" for k, v in postfix.items())
        print(f"[{self.name}] {done}/{self.total} {self.unit} elapsed {elapsed:.0f}s eta {eta:.0f}s{extra}",
              file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
