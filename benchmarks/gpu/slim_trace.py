"""Cut a torch.profiler chrome trace down to what the device-timeline analysis reads (kernels, copies, the
host's ops, runtime calls and phase spans, with their correlation ids), so that a profile of a 13B step
comes back from the device machine: python benchmarks/gpu/slim_trace.py trace.json.gz slim.json.gz"""
from __future__ import annotations

import gzip
import json
import sys

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


if __name__ == "__main__":
    src, dst = sys.argv[1:3]
    with gzip.open(src, "rt") as fh:
        events = json.load(fh).get("traceEvents", [])
    with gzip.open(dst, "wt") as fh:
        json.dump({"traceEvents": slim(events)}, fh, separators=(",", ":"))
