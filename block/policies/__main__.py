"""``python -m block.policies``: print DESIGN.md's policy table, generated from the registry; ``--write FILE``
replaces the table between the ``policy-table`` markers of FILE (docs/DESIGN.md) instead, so it cannot go stale."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from block.policies.registry import policy_table

START = "<!-- policy-table:start (python -m block.policies --write docs/DESIGN.md) -->"
END = "<!-- policy-table:end -->"


def with_table(text: str) -> str:
    """``text`` with the block between the markers replaced by the current table (ValueError without markers)."""
    pat = re.compile(re.escape(START) + r"\n.*?" + re.escape(END), re.S)
    if not pat.search(text):
        raise ValueError(f"no {START!r} ... {END!r} block")
    return pat.sub(lambda _: f"{START}\n{policy_table()}{END}", text, count=1)


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m block.policies", description=__doc__)
    ap.add_argument("--write", metavar="FILE", help="update the table inside FILE (e.g. docs/DESIGN.md)")
    args = ap.parse_args()
    if args.write is None:
        print(policy_table(), end="")
        return
    path = Path(args.write)
    path.write_text(with_table(path.read_text()))


if __name__ == "__main__":
    main()
