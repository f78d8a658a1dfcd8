"""Cut a torch.profiler chrome trace down to what the device-timeline analysis reads (kernels, copies, the
host's ops, runtime calls and phase spans, with their correlation ids), so that a profile of a 13B step
comes back from the device machine: python benchmarks/gpu/slim_trace.py trace.json.gz slim.json.gz"""
from __future__ import annotations

import argparse
import gzip
import json

from accelbench.errors import ConfigError
from accelbench.train.profiling import read_trace

KEEP = ("kernel", "gpu_memcpy", "gpu_memset", "cuda_runtime", "cuda_driver", "user_annotation",
        "gpu_user_annotation", "cpu_op")


def slim(events: list[dict]) -> list[dict]:
    out = []
    for e in events:
        if e.get("cat") in KEEP and "ts" in e and "dur" in e:
            corr = (e.get("args") or {}).get("correlation")
            kept = {"cat": e["cat"], "name": e.get("name", ""), "ts": e["ts"], "dur": e["dur"], "pid": e.get("pid"),
                    "tid": e.get("tid")}
            if corr is not None:
                kept["args"] = {"correlation": corr}
            out.append(kept)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split(":")[0])
    p.add_argument("src", help="a profile's trace.json.gz")
    p.add_argument("dst", help="where the slimmed trace goes (gzipped JSON)")
    a = p.parse_args()
    try:
        events = read_trace(a.src)
    except ConfigError as exc:
        p.error(str(exc))
    with gzip.open(a.dst, "wt") as fh:
        json.dump({"traceEvents": slim(events)}, fh, separators=(",", ":"))


if __name__ == "__main__":
    main()
