"""What makes the training loop fast, kept apart from the lesson (pipeline/loop.py): its compiled step (and what it
takes to build it in any folder, or to fail in one line), the data layout, when compiling pays, the deterministic
switch, and how often fit() streams the trajectory out.

None of it changes what is computed, only how fast: each setting says why it is there and names the bench row
(benchmarks/bench.py) that gets worse without it. This module does not import pipeline.loop; loop imports it.
"""

from __future__ import annotations

import contextlib
import logging
import shlex
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn, optim

from pipeline.errors import BuildError

log = logging.getLogger(__name__)

TrainStep = Callable[[nn.Module, nn.Module, optim.Optimizer, torch.Tensor, torch.Tensor], torch.Tensor]

# How often fit() hands the growing trajectory to on_epochs: each second, for a live curve in the MLflow UI,
# or each 1000 epochs, one full MLflow request per series. Smaller pieces cost more than they save: every
# request has a fixed cost, so more, smaller requests made a run log slower (bench P2).
STREAM_EPOCHS, STREAM_SECONDS = 1000, 1.0


@contextlib.contextmanager
def module_attributes(module: object, **values: Any) -> Iterator[None]:
    """Set attributes of `module` (or of a class) for the duration of the block, then put the old values back
    (also on error).

    Each attribute must exist already: a misspelt or removed name raises AttributeError instead of being added.
    """
    saved = {name: getattr(module, name) for name in values}
    for name, value in values.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def compiled_train_step(train_step: TrainStep) -> TrainStep:
    """train_step through torch.compile: the same five steps, fused into two passes over the data.

    At large N the step is bound by memory traffic, and two settings decide it (bench P3 N=1e7, against the floor
    of one torch pass for sum x, sum y, sum xy, sum x^2):
    - Inductor rewrites nn.Linear's two matrix products as fused multiply-and-sum loops. As BLAS calls, the forward
      X @ W.T writes an (N, 1) result and the weight gradient, a (1, N) @ (N, 1) product, runs far slower than a
      dot product; without the rewrite the compiled step loses most of what compiling gains.
    - The partitioner is told to save no activation: the backward recomputes the residual X @ W.T + b - y from X and
      y instead of keeping 2/N (y_pred - y) from the forward. That saved tensor was a fresh N-row buffer every step,
      and allocating it (page faults on memory that malloc returns to the OS) dominated the step. Now the forward
      is one pass over x, y (the loss) and the backward one more (sum of r*x and of r).
    Both are compile-time settings that torch reads while compiling, which happens on the first call and on any
    recompilation (a new batch shape): the returned step applies them around each call, leaving the rest of the
    process unchanged. Applying them costs little per call, noise at the sizes that compile (should_compile).
    """
    import torch._functorch.config as functorch_config
    from torch._inductor.fx_passes import decompose_mem_bound_mm

    # Both products of nn.Linear(k, 1) are memory-bound (one side is k x 1), so decompose them at any size.
    limit = 2**62
    decompose_all: dict[str, Any] = {
        "cpu_max_first_dimension_decomposition": limit,
        "cpu_max_other_dimension_decomposition": limit,
    }
    options: dict[str, Any] = {"post_grad_fusion_options": {"decompose_mm_pass": decompose_all}}
    torch.use_deterministic_algorithms(True)  # also turns on inductor's deterministic mode
    compiled = torch.compile(train_step, options=options)

    def step(
        model: nn.Module, criterion: nn.Module, optimizer: optim.Optimizer, X: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        # The pass copies its limits from the inductor options only when its module is first imported (above,
        # before any options apply); while compiling it reads them from the module's globals: set those.
        with (
            functorch_config.patch(activation_memory_budget=0.0),
            module_attributes(decompose_mem_bound_mm, **decompose_all),
            quoted_library_dirs(),
            one_line_build_errors(),
        ):
            return compiled(model, criterion, optimizer, X, y)

    return step


@contextlib.contextmanager
def one_line_build_errors() -> Iterator[None]:
    """A compiled step that cannot be built here (no C++ compiler, missing headers, a failed link) raises
    BuildError, one line naming what is missing, instead of inductor's page of compiler output; that page goes to
    the debug log. Inductor's other errors are bugs, not the machine's: they keep their traceback."""
    from torch._inductor import exc

    try:
        yield
    except exc.InductorError as e:
        inner = e.inner_exception
        if isinstance(inner, exc.InvalidCxxCompiler):
            from torch._inductor import config as inductor_config

            compiler = inductor_config.cpp.cxx[-1]
            raise BuildError(
                f"the compiled step (train.compile) needs a C++ compiler, and {compiler!r} is not one that works "
                f"here: install g++ (or set CXX to a compiler), or set train.compile: off"
            ) from None
        if isinstance(inner, exc.CppCompileError):
            log.debug("the compiled step's build failed: %s", inner)
            lines = [line.strip() for line in inner.output.splitlines() if line.strip()]
            cause = next((line for line in lines if "error" in line.lower() or "cannot find" in line), None)
            raise BuildError(
                f"the compiled step (train.compile) could not be built: {cause or (lines or ['no output'])[0]}; set "
                f"train.compile: off, or PIPELINE_LOG_LEVEL=DEBUG for the compiler's output"
            ) from None
        raise


@contextlib.contextmanager
def quoted_library_dirs() -> Iterator[None]:
    """Quote the library folders inductor hands the C++ compiler, as it quotes the include folders already.

    torch 2.13's CppBuilder writes `-L<folder>` unquoted into a command line that it then splits on spaces
    (pytorch/pytorch#191010; #148271 quoted the include folders only): in a venv whose path holds a space,
    torch/lib is cut in two and the link fails. Builders made inside the block write `-L'<folder>'` instead,
    which splits back into exactly `-L<folder>`; a folder without such characters is written as torch writes it.
    Only the command changes, not what it builds (tests/test_loop.py). That test fails once torch quotes them
    itself: then this goes.
    """
    from torch._inductor import cpp_builder

    init = cpp_builder.CppBuilder.__init__
    if cpp_builder._IS_WINDOWS:  # torch quotes /LIBPATH:"..." there
        yield
        return

    def quoting_init(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        folders = self._build_option.get_libraries_dirs()
        self._libraries_dirs_args = "".join(f"-L{shlex.quote(folder)} " for folder in folders)

    with module_attributes(cpp_builder.CppBuilder, __init__=quoting_init):
        yield


def column_major(X: torch.Tensor) -> torch.Tensor:
    """One feature (N, 1) as the transpose of an (N,) row: the same memory and values, strides (1, N) not (1, 1).

    The strides of a size-1 dimension change no element's address, but MKL's gemm takes an (N, 1) operand with
    strides (1, 1) as row-major with leading dimension 1, and there nn.Linear's weight gradient, a (1, N) @ (N, 1)
    product, runs several times slower than a dot product, and the forward X @ W.T slower too. As a column-major
    operand both take BLAS's fast path, and the eager step is faster by as much (bench P3 N=1e6). Several
    features keep their row-major layout (a column-major copy would double X).
    """
    if X.shape[1] != 1:
        return X
    return X.reshape(1, -1).T


def should_compile(setting: str, method: str, rows_per_step: int, epochs: int) -> bool:
    """train.compile: on, off, or auto: compile the nn step when the work is large enough to repay compiling.

    Compiling is paid once per process. Per step (one feature, one thread) the compiled step saves more the more rows
    it has: eager allocates N-row temporaries, and above malloc's mmap threshold each one costs fresh pages. At
    small N the compiled step's fixed cost per call makes it slower than eager; the two break even near 3e5 rows,
    and the work must also be large enough to repay the compile (bench P3 at N=1e6 and 1e7).
    """
    if setting != "auto":
        return setting == "on"
    return method == "nn" and rows_per_step >= 300_000 and rows_per_step * epochs >= 3_000_000_000


def set_deterministic(threads: int) -> None:
    """Before any tensor work: `threads` threads (float32 sums at large N depend on it), and deterministic kernels for
    eager torch (an op without one raises instead of varying). torch.use_deterministic_algorithms(True) also imports
    torch._inductor, slow to import, for compiled code; compiled_train_step calls it in full."""
    torch.set_num_threads(threads)
    torch._C._set_deterministic_algorithms(True)
