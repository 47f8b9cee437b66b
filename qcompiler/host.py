"""Facts about the CPU this process runs on, where they change what onnxruntime computes.

A quantized model is written for a target, but people also run it in onnxruntime on the
build machine (tests, quick checks). On x86 without VNNI, onnxruntime's u8/s8 x s8 GEMM and
convolution kernels (emitted ``QLinearConv``/``QLinearMatMul``, or the ones its optimizer fuses
from DQ -> op -> Q groups) add products in saturating int16 pairs (``vpmaddubsw``), so two
large weights of one output channel overflow and the output is wrong. With VNNI
(``vpdpbusd``, AVX-512 VNNI or AVX-VNNI) or AMX the sums are exact. The checker uses this module
to warn when a model will saturate on the machine at hand (rule ``cpu-saturation``).

``QCOMPILER_HOST_ISA=avx2|vnni`` overrides the detection, so tests can pin a host and give
the same verdict on every machine.
"""

from __future__ import annotations

import functools
import os
import platform

__all__ = ["HOST_ISA_ENV", "cpu_flags", "host_description", "int16_pair_saturation", "PAIR_SUM_LIMIT"]

HOST_ISA_ENV = "QCOMPILER_HOST_ISA"
# |w1| + |w2| <= 128 keeps 255 * (|w1| + |w2|) within int16 (32767) for any u8 activation pair
PAIR_SUM_LIMIT = 128
_EXACT_DOT = frozenset({"avx512_vnni", "avx_vnni", "amx_int8", "avx_vnni_int8"})
_X86 = frozenset({"x86_64", "amd64", "i386", "i686", "x86"})


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags the kernel reports (Linux ``/proc/cpuinfo``); empty elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def int16_pair_saturation() -> bool:
    """True when onnxruntime's int8 GEMM/conv kernels saturate int16 pair sums on this CPU:
    x86 without VNNI/AMX. Unknown flags (not Linux) count as no VNNI on x86, the safe side."""
    pinned = os.environ.get(HOST_ISA_ENV, "").strip().lower()
    if pinned in ("avx2", "no-vnni"):
        return True
    if pinned in ("vnni", "none", "arm"):
        return False
    if platform.machine().lower() not in _X86:
        return False
    return not (cpu_flags() & _EXACT_DOT)


def host_description() -> str:
    """One phrase for messages: which CPU fact applies here."""
    pinned = os.environ.get(HOST_ISA_ENV, "").strip().lower()
    if pinned:
        return f"host ISA pinned by {HOST_ISA_ENV}={pinned}"
    return ("this x86 CPU has no VNNI" if int16_pair_saturation()
            else f"this {platform.machine() or 'CPU'} has exact int8 dot products")
