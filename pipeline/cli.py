"""What every stage's main() shares: argument parsing, logging set-up, one-line errors."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from pipeline.errors import PipelineError

log = logging.getLogger("pipeline")


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    return p


def run(stage: str, body: Callable[[argparse.Namespace], None], args: argparse.Namespace) -> int:
    """Run a stage body with logging configured; turn user errors into one line on stderr."""
    logging.basicConfig(level=logging.INFO, format=f"%(levelname)s {stage}: %(message)s", stream=sys.stderr)
    try:
        body(args)
    except PipelineError as e:  # fixable from the message alone: one line, no traceback
        print(f"error: {stage}: {e}", file=sys.stderr)
        return 2
    return 0
