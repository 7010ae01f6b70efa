"""The numerics settings (pipeline/numerics.py): applied before any library computes, in force in the libraries
themselves, recorded by the run, and a user's own choice kept only when asked for."""

from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import numerics
from tests.helpers import REPO, pipeline_env

x86_64 = pytest.mark.skipif(not numerics.portable_here(), reason="the settings are for x86-64 CPUs")
MKL_CBWR_BRANCH, MKL_CBWR_COMPATIBLE = 1, 3  # mkl_cbwr.h: what mkl_cbwr_get asks for, and the branch's value


def probe(**env: str) -> dict[str, object]:
    """What a fresh process that imports the pipeline ends up with, as the libraries themselves report it."""
    code = """
import ctypes, json, os, pipeline, torch
from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__
torch.ones(4, 4) @ torch.ones(4, 4)  # MKL reads MKL_CBWR at its first call
mkl = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
print(json.dumps({
    "tags": pipeline.numerics.tags(),
    "aten": torch.backends.cpu.get_cpu_capability(),
    "mkl_branch": mkl.mkl_serv_cbwr_get(1),
    "numpy": sorted(f for f in __cpu_dispatch__ if __cpu_features__[f]),
}))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], env=pipeline_env(**env), capture_output=True, text=True, check=True, cwd=REPO
    )
    result: dict[str, object] = json.loads(out.stdout.splitlines()[-1])
    return result


def test_pin_sets_every_setting_and_reports_what_it_replaced() -> None:
    env = {"MKL_CBWR": "AUTO", "ATEN_CPU_CAPABILITY": "avx2", "HOME": "/home/me"}
    replaced = numerics.pin(env)
    if numerics.portable_here():
        assert replaced == {"MKL_CBWR": "AUTO"}  # an equal value is not a replacement
        assert env == numerics.PORTABLE | {"HOME": "/home/me"}
    native = {"PIPELINE_NUMERICS": "native", "MKL_CBWR": "AUTO"}
    assert numerics.pin(native) == {} and native == {"PIPELINE_NUMERICS": "native", "MKL_CBWR": "AUTO"}


@x86_64
def test_this_test_process_was_pinned_before_numpy_or_torch_loaded() -> None:
    import torch

    assert numerics.LATE == (), f"{numerics.LATE} imported before the pipeline: their kernels are the CPU's own"
    assert torch.backends.cpu.get_cpu_capability() == "AVX2"
    mkl = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
    assert mkl.mkl_serv_cbwr_get(MKL_CBWR_BRANCH) == MKL_CBWR_COMPATIBLE


@pytest.mark.stage
@x86_64
def test_the_libraries_run_the_pinned_kernels_and_the_run_records_a_users_override() -> None:
    pinned = probe(MKL_CBWR="AUTO")  # a user's own setting, not kept
    assert pinned["aten"] == "AVX2" and pinned["mkl_branch"] == MKL_CBWR_COMPATIBLE
    assert pinned["numpy"] == ["X86_V3"], "numpy's AVX-512 loops are still enabled"
    tags = pinned["tags"]
    assert isinstance(tags, dict)
    assert tags["numerics"] == "portable" and tags["numerics.MKL_CBWR"] == "COMPATIBLE"
    assert tags["numerics.replaced"] == "MKL_CBWR=AUTO"

    native = probe(MKL_CBWR="AUTO", PIPELINE_NUMERICS="native")  # deliberately the CPU's own kernels
    assert native["mkl_branch"] != MKL_CBWR_COMPATIBLE
    tags = native["tags"]
    assert isinstance(tags, dict)
    assert tags["numerics"] == "native" and tags["numerics.MKL_CBWR"] == "AUTO"


def test_an_unknown_mode_is_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline import generate

    monkeypatch.setenv("PIPELINE_NUMERICS", "fast")
    assert generate.main(["--train", "t.parquet", "--test", "s.parquet"]) == 2
    assert capsys.readouterr().err == "error: generate: PIPELINE_NUMERICS = 'fast': must be one of portable, native\n"


@pytest.mark.stage
@x86_64
def test_the_compiled_step_is_built_for_avx2_whatever_the_cpu(tmp_path: Path) -> None:
    """Inductor's vector width and -march come from the pinned settings, not from this CPU, and the library it
    builds uses no AVX-512 register: the same code and flags, so the same float operations, on every AVX2 CPU.
    (tests/test_cpus.py also runs a compiled step under emulated CPUs, at small N.)"""
    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) is needed to read the compiled step")
    code = """
import numpy as np, torch, pipeline
from pipeline import loop
from torch._inductor import cpp_builder, cpu_vec_isa
x = np.linspace(-1, 1, 4096, dtype=np.float32)
X, Y = loop.as_arrays(x, 3 * x)
learner = loop.make_learner("nn", loop.make_model(0), X, Y, "sgd", 0.1, 0.0, True)
loop.fit(learner, len(X), 2)
print(cpu_vec_isa.pick_vec_isa().bit_width(), " ".join(cpp_builder._get_cpu_arch_cflags("g++")))
"""
    env = pipeline_env(TORCHINDUCTOR_CACHE_DIR=str(tmp_path))  # compiled here, not taken from a cache
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.split()[-2:] == ["256", "march=x86-64-v3"]
    # The step's kernels, not the one-instruction probes inductor builds to learn what this CPU can run.
    libraries = [lib for lib in tmp_path.rglob("*.so") if "cpp_prefix.h" in lib.with_suffix(".cpp").read_text()]
    assert libraries, "the compiled step built no library"
    code_of = {
        lib.name: subprocess.run(["objdump", "-d", str(lib)], capture_output=True, text=True).stdout
        for lib in libraries
    }
    assert not [name for name, asm in code_of.items() if "%zmm" in asm], "AVX-512 registers in the compiled step"
    assert any("%ymm" in asm for asm in code_of.values()), "the compiled step is not vectorised for AVX2"
