"""``python -m normfold.codes --markdown [TABLE ...]``: print README's tables of codes."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from normfold.codes.tables import TABLES, markdown


def _main(argv: Sequence[str]) -> int:
    """``python -m normfold.codes --markdown [TABLE ...]``: print README's tables of codes."""
    if not argv or argv[0] != "--markdown" or any(a not in TABLES for a in argv[1:]):
        sys.stderr.write(f"usage: python -m normfold.codes --markdown [{' | '.join(TABLES)} ...]\n")
        return 2
    for name in argv[1:] or list(TABLES):
        sys.stdout.write(f"<!-- table of codes: {name} -->\n{markdown(name)}\n\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
