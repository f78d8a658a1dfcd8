"""Launch the ranks through torchrun's machinery (torch.distributed.launcher), one node or many."""
from __future__ import annotations

import signal
import socket
from dataclasses import dataclass
from typing import Any

from ..errors import AccelbenchError, ConfigError


@dataclass(frozen=True)
class LaunchSpec:
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    run_id: str | None = None

    def check(self) -> None:
        if self.nproc_per_node < 1:
            raise ConfigError(f"--nproc-per-node {self.nproc_per_node} is impossible: give 1 or more")
        if self.nnodes < 1:
            raise ConfigError(f"--nnodes {self.nnodes} is impossible: give 1 or more")
        if not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"--node-rank {self.node_rank} is impossible with --nnodes {self.nnodes}: "
                              f"give 0..{self.nnodes - 1}")
        if self.master_port is not None and not 0 < self.master_port < 65536:
            raise ConfigError(f"--master-port {self.master_port} is not a TCP port: give 1..65535")
        if self.nnodes > 1 and self.master_port is None:
            raise ConfigError("--master-port is required with --nnodes > 1 (every node must use the same one)")

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(spec: LaunchSpec, entrypoint: Any, *args: Any) -> dict[int, Any]:
    """Run ``entrypoint(*args)`` in every local rank; returns {global rank: return value} of this node.

    Static rendezvous, exactly as ``torchrun --nnodes N --node-rank R --master-addr A --master-port P``.
    A rank that dies makes the agent stop the others and raise ChildFailedError.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    spec.check()
    port = spec.master_port or free_port()
    config = LaunchConfig(
        min_nodes=spec.nnodes, max_nodes=spec.nnodes, nproc_per_node=spec.nproc_per_node,
        # every node must name the same run: the rendezvous store keys are prefixed with it
        run_id=spec.run_id or "accelbench", rdzv_backend="static",
        rdzv_endpoint=f"{spec.master_addr}:{port}", rdzv_configs={"rank": spec.node_rank, "timeout": 900},
        max_restarts=0, monitor_interval=0.5, start_method="spawn",
    )
    try:
        return elastic_launch(config, entrypoint)(*args)
    except ChildFailedError as exc:
        failures = sorted(exc.failures.items(), key=lambda rf: rf[1].timestamp)
        raise RankFailed("; ".join(_describe(rank, f) for rank, f in failures),
                         exitcodes={rank: f.exitcode for rank, f in failures}) from None
    except SignalException as exc:
        # the agent has already forwarded the signal to the ranks and waited for them to save
        raise LaunchInterrupted(f"launcher got {signal.Signals(exc.sigval).name}", sigval=int(exc.sigval)) from None


def _describe(rank: int, failure: Any) -> str:
    if failure.exitcode < 0:  # killed by a signal
        try:
            how = f"was killed by {signal.Signals(-failure.exitcode).name}"
        except ValueError:
            how = f"was killed by signal {-failure.exitcode}"
    else:
        how = f"failed (exit code {failure.exitcode})"
    msg = failure.message if isinstance(failure.message, str) else failure.message.get("message", "")
    msg = "" if not msg or msg.startswith("To enable traceback") else f": {msg}"
    return f"rank {rank} {how}{msg}".strip()


class RankFailed(AccelbenchError):
    def __init__(self, message: str, exitcodes: dict[int, int] | None = None):
        super().__init__(message)
        self.exitcodes = exitcodes or {}


class LaunchInterrupted(AccelbenchError):
    def __init__(self, message: str, sigval: int):
        super().__init__(message)
        self.sigval = sigval
