#!/usr/bin/env bash
# Run first in every device-tool call (carry .whl): installs what the GPU image lacks into /tmp/site.
# .whl holds: deepspeed sdist, hjson, pydantic(+core, annotated-types, typing-inspection, typing-extensions),
# transformers 5.24 (same as CI), liger-kernel: `bash benchmarks/gpu/fetch_wheels.sh` fetches them here.
set -euo pipefail
[ -f /tmp/site/.accelbench-ready ] && exit 0  # a second suite run in the same call
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
rm -rf /tmp/ds && mkdir -p /tmp/ds && tar -xzf .whl/deepspeed-*.tar.gz -C /tmp/ds
(cd /tmp/ds/deepspeed-* && DS_BUILD_OPS=0 python3 -m pip install -q --no-index --no-deps --no-build-isolation \
    --target /tmp/site . >/tmp/ds_build.log 2>&1) || { tail -20 /tmp/ds_build.log; exit 1; }
# the project itself, without dependencies (they are in the image or in /tmp/site)
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site . >/tmp/ab_build.log 2>&1 \
    || { tail -20 /tmp/ab_build.log; exit 1; }
touch /tmp/site/.accelbench-ready
echo "device setup done"
