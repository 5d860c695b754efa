"""One atomic writer: every temp-file-then-rename write in the repository goes through ``vidur.records.write_atomic``
(hidden temp file beside the target, fsync, rename, temp removed on failure, stale ones cleared by the next run)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("vidur", "block", "experiments", "analysis", "length_estimation", "data", "hydra_plugins", "benchmarks")
RENAME = re.compile(r"\bos\.(replace|rename)\(|\.rename\((?!columns=)")

# the renames that are not "write a file atomically", each with the reason
ALLOWED = {
    "vidur/records.py": "write_atomic itself",
    "block/deploy/hostctl.py": "host-side tool that imports only the standard library (its docstring)",
    "length_estimation/transformer.py": "replace_dir swaps a whole checkpoint directory",
    "experiments/deploy.py": "moves finished files into the run directory",
    "vidur/speedups.py": "moves a whole compiled build's folder into place (its files are written inside it first)",
}


def test_every_atomic_write_uses_write_atomic():
    found = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            lines = [i for i, line in enumerate(path.read_text().splitlines(), 1) if RENAME.search(line)]
            if lines and rel not in ALLOWED:
                found[rel] = lines
    assert found == {}, f"temp-file-then-rename outside vidur.records.write_atomic: {found}"
