"""What every stage's main() shares: argument parsing, logging set-up, one-line errors."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import NoReturn

from pipeline import numerics
from pipeline.errors import PipelineError

log = logging.getLogger("pipeline")


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    return p


LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LEVEL_VARIABLE = "PIPELINE_LOG_LEVEL"  # how much the stages say; INFO unless set


def run(stage: str, body: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run a stage body with logging configured; turn user errors into one line on stderr. The exit status is the
    body's (0 if it returns None), or the error's."""
    level = os.environ.get(LEVEL_VARIABLE, "INFO").upper()
    if level not in LEVELS:
        print(f"error: {stage}: {LEVEL_VARIABLE} = {level!r}: must be one of {', '.join(LEVELS)}", file=sys.stderr)
        return 2
    if numerics.mode() not in numerics.MODES:
        print(
            f"error: {stage}: {numerics.VARIABLE} = {numerics.mode()!r}: must be one of {', '.join(numerics.MODES)}",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(format=f"%(levelname)s {stage}: %(message)s", stream=sys.stderr)
    log.setLevel(level)  # the pipeline's own logger: libraries keep their levels
    try:
        return body(args) or 0
    except PipelineError as e:  # fixable from the message alone: one line, no traceback
        print(f"error: {stage}: {e}", file=sys.stderr)
        return e.exit_status


def exit_now(code: int) -> NoReturn:
    """End a stage's process with `code`, skipping the interpreter's teardown.

    By the time main() returns, every output is on disk (written atomically and fsync'd, pipeline/io.py) and
    the MLflow run has ended (the stage waits for its worker). What is left is Python freeing its modules, a
    large share of a train run once torch.optim has imported torch._dynamo (bench P1). Only
    `python -m pipeline.<stage>` calls this; main() itself returns, so callers in the same process (the
    tests) are unaffected.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
