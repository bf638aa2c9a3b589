"""`python -m msabank.serve BANK [options]`: the same as `msabank serve` (options: `msabank serve --help`).

Under torchrun (WORLD_SIZE > 1) it serves in memory parallel: rank 0 serves HTTP, every rank holds one
shard of the routing index (msabank.serve.parallel).
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from msabank.cli.main import main as cli_main

    cli_main(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
