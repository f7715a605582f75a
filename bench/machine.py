"""Where a figure was measured: the machine description every results file carries. Standard library only.

The same benchmark on two hosts of one "2-core" kind can disagree by a factor: on the
2-core hosts this project runs on, batching 16 sequences was worth 1.5x in one CPU's
fp32 decode step and 5.5x in another's (``bench/results/serve*.md``). So a result names
the CPU model, its vector extensions (what onnxruntime's and torch's kernels pick their
code path by) and its cache sizes, not only ``x86_64``. Kept free of third-party imports:
a GPU host benchmarked with ``--prepared`` may lack this project's packages.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

# Vector extensions the CPU kernels choose by (MLAS, oneDNN): the widest float, int8 and matrix units.
SIMD_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16", "asimd", "sve")
TITLE_FLAGS = ("avx2", "avx512f", "amx_int8", "asimd", "sve")  # of those, what a title names


def machine() -> dict:
    """Python, CPU model, vector extensions, caches, cores and memory of this machine."""
    info = _cpuinfo()
    flags = set((info.get("flags") or info.get("Features") or "").split())
    return {
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "model": info.get("model name") or platform.machine(),
        "simd": [f for f in SIMD_FLAGS if f in flags],
        "caches": _caches(),
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


def describe(m: dict) -> str:
    """One line for a results file's title: ``2 cores, Intel(R) Xeon(R) Processor (avx512f, amx_int8), L2 2048K, 23.5 GiB``."""
    simd = m.get("simd", [])
    shown = [f for f in simd if f in TITLE_FLAGS and not (f == "avx2" and "avx512f" in simd)]  # the widest
    caches = m.get("caches", {})
    return ", ".join(
        part
        for part in (
            f"{m['cores']} cores",
            m.get("model", m["cpu"]) + (f" ({', '.join(shown)})" if shown else ""),
            f"L2 {caches['L2']}" if "L2" in caches else "",
            f"{m['memory_gib']} GiB" if "memory_gib" in m else "",
        )
        if part
    )


def _cpuinfo() -> dict:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def _caches() -> dict[str, str]:
    """Data and unified cache sizes of CPU 0 by level (``L1d``, ``L2``, ``L3``), as sysfs gives them (``2048K``)."""
    sizes = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind = (index / "level").read_text().strip(), (index / "type").read_text().strip()
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        if kind != "Instruction":
            sizes[f"L{level}" + ("d" if kind == "Data" else "")] = size
    return sizes
