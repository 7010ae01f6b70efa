"""What every stage's main() shares: argument parsing, logging set-up, one-line errors."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from pipeline.config import ConfigError
from pipeline.data import DataError

log = logging.getLogger("pipeline")

# Errors the user can fix from the message alone: printed as one line, no traceback, exit status 2.
USER_ERRORS: tuple[type[Exception], ...] = (ConfigError, DataError)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    return p


def run(stage: str, body: Callable[[argparse.Namespace], None], args: argparse.Namespace) -> int:
    """Run a stage body with logging configured; turn user errors into one line on stderr."""
    logging.basicConfig(level=logging.INFO, format=f"%(levelname)s {stage}: %(message)s", stream=sys.stderr)
    try:
        body(args)
    except USER_ERRORS as e:
        print(f"error: {stage}: {e}", file=sys.stderr)
        return 2
    return 0
