"""Peak dense FLOP/s of NVIDIA data-centre GPUs, from NVIDIA's datasheets (no sparsity).

Matched by device name as torch reports it. A name that matches nothing is unknown: MFU is then
not computed rather than guessed.
"""
from __future__ import annotations

import re

T = 1e12
# (pattern on the upper-cased device name, {dtype: FLOP/s}, source) -- most specific first
PEAK_TABLE: list[tuple[str, dict[str, float], str]] = [
    (r"H200.*NVL", {"bf16": 835 * T, "fp16": 835 * T, "tf32": 417.5 * T, "fp32": 60 * T}, "NVIDIA H200 NVL datasheet"),
    (r"H200", {"bf16": 989.4 * T, "fp16": 989.4 * T, "tf32": 494.7 * T, "fp32": 66.9 * T}, "NVIDIA H200 SXM datasheet"),
    (r"H100.*NVL", {"bf16": 835 * T, "fp16": 835 * T, "tf32": 417.5 * T, "fp32": 60 * T}, "NVIDIA H100 NVL datasheet"),
    (r"H100.*PCIE", {"bf16": 756.5 * T, "fp16": 756.5 * T, "tf32": 378 * T, "fp32": 51.2 * T}, "NVIDIA H100 PCIe datasheet"),
    (r"(H100)|(H800.*(SXM|HBM3))", {"bf16": 989.4 * T, "fp16": 989.4 * T, "tf32": 494.7 * T, "fp32": 66.9 * T},
     "NVIDIA H100 SXM datasheet"),
    (r"A100|A800", {"bf16": 312 * T, "fp16": 312 * T, "tf32": 156 * T, "fp32": 19.5 * T}, "NVIDIA A100/A800 datasheet"),
    (r"L40S", {"bf16": 362.05 * T, "fp16": 362.05 * T, "tf32": 183 * T, "fp32": 91.6 * T}, "NVIDIA L40S datasheet"),
    (r"V100", {"fp16": 125 * T, "fp32": 15.7 * T}, "NVIDIA V100 SXM2 datasheet"),
]


def lookup(device_name: str, dtype: str) -> tuple[float | None, str]:
    name = device_name.upper()
    for pattern, peaks, source in PEAK_TABLE:
        if re.search(pattern, name):
            if dtype in peaks:
                return peaks[dtype], source
            return None, f"{source} gives no dense {dtype} figure"
    return None, f"unknown device {device_name!r}: not in the NVIDIA peak table"


# PCIe generation of each product's host link (x16), from the same datasheets; NVL and PCIe boards alike
PCIE_GEN: list[tuple[str, int]] = [(r"H200|H100|H800|GH200", 5), (r"A100|A800|L40S|A30\b|A10\b", 4), (r"V100", 3)]
LANE_BYTES = {3: 0.985e9, 4: 1.969e9, 5: 3.938e9, 6: 7.563e9}  # per lane and direction, after line encoding


def pcie_generation(device_name: str) -> int | None:
    name = device_name.upper()
    return next((gen for pattern, gen in PCIE_GEN if re.search(pattern, name)), None)
