"""Test-only fault injection: environment variables that make a rank fail on purpose.

None of these is set in a real run. Each takes ``STAGE:STEP[:ARG]`` (STEP counts from 1):

- ``ACCELBENCH_INJECT_OOM``  -- CPU backend only: raise ``accelbench.cpu.InjectedOOM`` at that step while the
  micro-batch is larger than ARG (default 1), so the trainer's back-off ends the fault.
- ``ACCELBENCH_INJECT_NAN``  -- multiply that step's loss by NaN.
- ``ACCELBENCH_INJECT_KILL`` -- rank ARG (default 0) kills itself with SIGKILL at that step.
- ``ACCELBENCH_INJECT_HANG`` -- rank ARG (default 0) sleeps forever at that step.
"""
from __future__ import annotations

import os
import signal
import time
from typing import Any, NamedTuple

ENV = {"oom": "ACCELBENCH_INJECT_OOM", "nan": "ACCELBENCH_INJECT_NAN", "kill": "ACCELBENCH_INJECT_KILL",
       "hang": "ACCELBENCH_INJECT_HANG"}


class Fault(NamedTuple):
    stage: str
    step: int
    arg: int | None


def fault_at(kind: str, stage: str, step: int) -> Fault | None:
    """The injected fault of ``kind`` when it targets ``stage``/``step``, else None."""
    raw = os.environ.get(ENV[kind])
    if not raw:
        return None
    parts = raw.split(":")
    fault = Fault(parts[0], int(parts[1]), int(parts[2]) if len(parts) > 2 else None)
    return fault if (fault.stage, fault.step) == (stage, step) else None


def before_micro_step(stage: str, step: int, *, rank: int, micro_batch: int, backend: str) -> None:
    """Called before every micro-batch of optimizer step ``step`` (1-based)."""
    if (f := fault_at("oom", stage, step)) and backend == "cpu" and micro_batch > (f.arg or 1):
        from ..cpu import InjectedOOM

        raise InjectedOOM(f"DefaultCPUAllocator: can't allocate memory (injected at micro-batch {micro_batch})")
    if (f := fault_at("kill", stage, step)) and rank == (f.arg or 0):
        os.kill(os.getpid(), signal.SIGKILL)
    if (f := fault_at("hang", stage, step)) and rank == (f.arg or 0):
        while True:  # sleeps release the GIL, as a rank stuck in a collective does
            time.sleep(3600)


def poison_loss(loss: Any, stage: str, step: int) -> Any:
    return loss * float("nan") if fault_at("nan", stage, step) else loss
