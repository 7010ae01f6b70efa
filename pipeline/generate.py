"""DVC stage `generate`: params.yaml -> seeded train and test tables (Parquet)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from pipeline import cli, config, data


def generate(args: argparse.Namespace) -> None:
    cfg = config.load(args.params)
    g = cfg.generate
    # Drawn and written a chunk at a time: memory stays flat from 100 rows to 1e8.
    pieces = data.split(data.generate_chunks(g), g.n_train)
    n_train, n_test = data.write_tables(pieces, (args.train, args.test), g.n_features)
    cli.log.info("wrote %d train rows to %s and %d test rows to %s", n_train, args.train, n_test, args.test)


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.parser(__doc__ or "")
    p.add_argument("--train", required=True, help="train table to write (Parquet)")
    p.add_argument("--test", required=True, help="test table to write (Parquet)")
    return cli.run("generate", generate, p.parse_args(argv))


if __name__ == "__main__":
    cli.exit_now(main())
