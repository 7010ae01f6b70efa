"""The numerical settings every stage runs with: the same commit and params give the same bytes on any x86-64
CPU with AVX2 (Intel since 2013, AMD since 2015), with or without AVX-512.

Each library below picks its kernels for the CPU it finds, and kernels of different vector widths add in
different orders, so results differ in the last bits from one machine to the next. Each reads its setting from
the environment once, at import or at its first call: `pin()` must run before any of them computes, so
`pipeline/__init__.py` calls it and importing anything from the package pins them.

OpenBLAS, numpy's and scipy's BLAS, also picks kernels per CPU, and its one switch (OPENBLAS_CORETYPE) belongs
to the machine: some set it to work around CPUs that old builds mis-handle. So no value the pipeline writes
goes through it: theory.py sums in a fixed order and solves small systems in mpmath (software arithmetic).

PIPELINE_NUMERICS=native leaves the environment as it is (the libraries' fastest kernels for this CPU, or a
user's own settings): faster at large N, and the run records that its bytes are this machine's.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import MutableMapping

VARIABLE = "PIPELINE_NUMERICS"
MODES = ("portable", "native")

PORTABLE = {
    # Intel MKL, torch's BLAS and LAPACK (nn.Linear's products): its Conditional Numerical Reproducibility
    # branch that gives one result on Intel and AMD CPUs alike (the AVX2 branch does so on Intel CPUs only).
    "MKL_CBWR": "COMPATIBLE",
    # ATen's vectorised kernels (sums, elementwise ops, the optimizers' updates): AVX2 on AVX-512 CPUs too.
    # Inductor reads it as well, for the vector width of the compiled step's C++.
    "ATEN_CPU_CAPABILITY": "avx2",
    # oneDNN's kernels, for any op that reaches them.
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    # The compiled step's C++ is built for x86-64-v3 (AVX2, FMA), not -march=native.
    "TORCHINDUCTOR_CPP_MARCH": "x86-64-v3",
    # numpy's own dispatched loops: the AVX2 ones on AVX-512 CPUs too (names of numpy 2.4's targets).
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",
}
LIBRARIES = ("numpy", "torch", "scipy")  # imported before pin(), they may already have read their settings


def portable_here() -> bool:
    """The settings are for x86-64: elsewhere (Apple silicon, aarch64 Linux) there is no MKL and other kernels."""
    return platform.machine().lower() in ("x86_64", "amd64")


def mode(environ: MutableMapping[str, str] = os.environ) -> str:
    """PIPELINE_NUMERICS, portable unless set; cli.run refuses a value that is not one of MODES."""
    return environ.get(VARIABLE, "portable").strip().lower() or "portable"


def pin(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Set PORTABLE in `environ` (unless PIPELINE_NUMERICS=native, or not on x86-64); returns the values it
    replaced, so that a run can record a user's setting it did not keep."""
    if mode(environ) == "native" or not portable_here():
        return {}
    replaced = {k: environ[k] for k, v in PORTABLE.items() if environ.get(k, v) != v}
    environ.update(PORTABLE)
    return replaced


REPLACED = pin()  # an effect of importing the package (pipeline/__init__.py), recorded by tags()
LATE = tuple(name for name in LIBRARIES if name in sys.modules)  # not yet imported, normally


def tags() -> dict[str, str]:
    """What a run records: the mode, each setting in force, and anything that weakens the guarantee."""
    effective = "portable" if mode() == "portable" and portable_here() else "native"
    out = {"numerics": effective, "cpu": cpu_model()}
    out |= {f"numerics.{k}": os.environ.get(k, "unset") for k in PORTABLE}
    if REPLACED:
        out["numerics.replaced"] = ", ".join(f"{k}={v}" for k, v in REPLACED.items())
    if LATE:
        out["numerics.imported_before_pin"] = ", ".join(LATE)
    if os.environ.get("OPENBLAS_CORETYPE"):  # the machine's; no output depends on it (see above)
        out["numerics.OPENBLAS_CORETYPE"] = os.environ["OPENBLAS_CORETYPE"]
    return out


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
