"""DVC stage `generate`: params.yaml -> seeded train and test tables."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pipeline import cli, config, data


def generate(args: argparse.Namespace) -> None:
    cfg = config.load(args.params)
    train, test = data.generate(cfg.generate)
    data.write_table(train, args.train)
    data.write_table(test, args.test)
    cli.log.info("wrote %d train rows to %s and %d test rows to %s", len(train), args.train, len(test), args.test)


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.parser(__doc__ or "")
    p.add_argument("--train", required=True, help="train table to write (CSV)")
    p.add_argument("--test", required=True, help="test table to write (CSV)")
    return cli.run("generate", generate, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
