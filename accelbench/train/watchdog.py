"""Per-rank liveness: the hang watchdog and the stop request raised by SIGTERM/SIGINT.

The watchdog is a daemon thread. Ranks stuck in a collective or a sleep release the GIL, so it
keeps running; when no step has finished for ``timeout`` seconds it writes this rank's Python
stacks to ``RUN_DIR/hang/``, touches a trigger file that makes the node's other ranks dump theirs
too, waits briefly for them, then ends the process. The launcher's agent sees the exit, stops the
remaining ranks, and the launcher names the stuck step from the reports.
A C-level ``faulthandler.dump_traceback_later`` backstop covers a rank that holds the GIL forever.
"""
from __future__ import annotations

import faulthandler
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import IO, Any

HANG_EXIT = 86  # the exit code of a rank ended by the watchdog
HANG_DIR = "hang"
TRIGGER = "TRIGGER"


class Watchdog:
    def __init__(self, timeout: float, run_dir: str | Path, *, rank: int, local_world: int):
        self.timeout, self.rank, self.local_world = float(timeout), rank, local_world
        self.dir = Path(run_dir) / HANG_DIR
        self._where = ("", 0)  # (stage, last finished step)
        self._last = time.monotonic()
        self._armed = False
        self._stop = threading.Event()
        self._poll = min(1.0, max(0.1, self.timeout / 20))
        self._backstop: IO[str] | None = None
        self._thread = threading.Thread(target=self._loop, name="accelbench-watchdog", daemon=True)
        self._thread.start()

    def beat(self, stage: str, step_done: int) -> None:
        """A step finished (or a stage's loop begins): restart the clock."""
        self._where, self._last, self._armed = (stage, step_done), time.monotonic(), True
        if self._backstop is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._backstop = open(self.dir / f"backstop-rank{self.rank}.txt", "w", encoding="utf-8")
        # GIL-free last resort, well after the thread should have fired
        faulthandler.dump_traceback_later(self.timeout * 2 + 30, exit=True, file=self._backstop)

    def disarm(self) -> None:
        """Outside the training loop (saving, evaluation) there are no steps to wait for."""
        self._armed = False
        faulthandler.cancel_dump_traceback_later()

    def close(self) -> None:
        self.disarm()
        self._stop.set()
        if self._backstop is not None:
            self._backstop.close()
            path = Path(self._backstop.name)
            if path.exists() and path.stat().st_size == 0:
                path.unlink()
            try:
                self.dir.rmdir()  # only when nothing was reported
            except OSError:
                pass

    def _loop(self) -> None:
        while not self._stop.wait(self._poll):
            if self._armed and time.monotonic() - self._last > self.timeout:
                self._fire(detected=True)
            elif (self.dir / TRIGGER).exists():
                self._fire(detected=False)

    def _fire(self, *, detected: bool) -> None:
        from ..atomic import write_json_atomic

        self.dir.mkdir(parents=True, exist_ok=True)
        faulthandler.cancel_dump_traceback_later()  # this report replaces the backstop's
        if self._backstop is not None:
            Path(self._backstop.name).unlink(missing_ok=True)
        stage, done = self._where
        stacks = self.dir / f"stacks-rank{self.rank}.txt"
        with open(stacks, "w", encoding="utf-8") as fh:
            fh.write(f"rank {self.rank} pid {os.getpid()}: last finished {stage or '-'} step {done}, "
                     f"waiting for step {done + 1}; --hang-timeout {self.timeout:g} s; "
                     f"{'detected here' if detected else 'dumped on a peer rank report'}\n\n")
            fh.flush()
            faulthandler.dump_traceback(fh, all_threads=True)
        write_json_atomic(self.dir / f"rank{self.rank}.json",
                          {"rank": self.rank, "stage": stage, "stuck_step": done + 1, "timeout_s": self.timeout,
                           "detected": detected, "stacks": str(stacks)})
        if detected:
            (self.dir / TRIGGER).touch()
        deadline = time.monotonic() + 5  # let the node's other ranks dump before the agent stops them
        while time.monotonic() < deadline and len(list(self.dir.glob("rank*.json"))) < self.local_world:
            time.sleep(0.1)
        os._exit(HANG_EXIT)


def read_hang_reports(run_dir: str | Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted((Path(run_dir) / HANG_DIR).glob("rank*.json")):
        try:
            out.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    return out


class StopRequest:
    """SIGTERM/SIGINT set a flag; the training loop saves a checkpoint at the end of the step and stops.

    Ctrl-C reaches every process of the terminal's group and the agent forwards the signal once more,
    so a repeat within a few seconds is the same request; a later one means "stop now".
    """

    GRACE_S = 5.0

    def __init__(self) -> None:
        self.signum = 0
        self._at = 0.0

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum and time.monotonic() - self._at > self.GRACE_S:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping without a checkpoint")
        if not self.signum:
            self.signum, self._at = signum, time.monotonic()

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""
