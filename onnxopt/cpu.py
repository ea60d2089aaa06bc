"""What the host CPU means for onnxruntime's integer kernels (x86 without VNNI saturates uint8 x int8 pair sums)."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})  # /proc/cpuinfo flags of exact 8-bit dot products
X86_MACHINES = frozenset({"x86_64", "amd64", "i386", "i686"})


def int8_pairs_saturate(cpuinfo: str | None = None, machine: str | None = None) -> bool:
    """Whether onnxruntime's uint8 x int8 GEMM on this CPU adds pairs of products in int16 (an x86 CPU with AVX2 and
    no VNNI: 2 x 255 x 127 > 32767, so 8-bit weights can saturate); False where unknown (not Linux, not x86).

    ``cpuinfo`` and ``machine`` stand in for ``/proc/cpuinfo`` and :func:`platform.machine` (tests)."""
    if cpuinfo is None and machine is None:
        return _host_saturates()
    if (machine or platform.machine()).lower() not in X86_MACHINES:
        return False
    for line in (cpuinfo or "").splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return "avx2" in flags and not flags & VNNI_FLAGS
    return False


@functools.cache
def _host_saturates() -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return int8_pairs_saturate(text, platform.machine())


def saturation_warning(pass_name: str, remedy: str = "reduce_range=true") -> str:
    """The warning a pass gives when it writes 8-bit weights for CPU kernels on a CPU where they can saturate."""
    return (
        f"{pass_name}: this CPU has AVX2 but no VNNI: onnxruntime's uint8 x int8 kernels add pairs of products in int16 here, "
        "which can saturate with 8-bit weights (PP-OCR cls INT8: cosine 0.993 against 0.9994 with 7-bit ones); "
        f"pass {remedy} for a model that will run on such CPUs (VNNI and ARM CPUs are exact either way)"
    )
