"""Loading the simulator's compiled build (``vidur.speedups`` makes it): which build fits these sources, and the
import hook that serves it.

Imported by ``vidur/__init__.py`` when ``BLOCK_REPRO_SPEEDUPS`` is set, before any simulator module, so it imports
nothing heavy. A build lives in the user's cache dir in a folder named by a hash of the sources it was compiled from
(``source_key``); a process loads it only when its own sources hash to that folder, so after an edit the modules load
as plain Python until the build is made again (with a warning when it was asked for): a stale build is never used.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
import sysconfig
import warnings
from pathlib import Path
from typing import Optional

from vidur.cache import default_cache_dir

ENV = "BLOCK_REPRO_SPEEDUPS"  # "1" (or true/yes/on): load the compiled modules when built for these sources
CACHE_ENV = "BLOCK_REPRO_SPEEDUPS_DIR"  # where builds live (default: <user cache>/block-repro/speedups)
# compiled together (a module's native types are checked against the others' at import): all or none is loaded
MODULES = ("vidur.engine", "vidur.sched.v0", "vidur.sched.v1", "vidur.candidate", "vidur.whatif",
           "vidur.execution_model.model")
MANIFEST = "manifest.json"
RECIPE = "vidur/speedups.py"  # how a build is made (its Cython directives): part of the key too
ROOT = Path(__file__).resolve().parent.parent  # the folder that holds the ``vidur`` package


def enabled() -> bool:
    """Whether this process was asked to use the compiled modules (``BLOCK_REPRO_SPEEDUPS``)."""
    return os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on")


def source_files(root: Path = ROOT) -> list[Path]:
    """The sources a build is made from: each module's ``.py`` and its ``.pxd`` declarations."""
    out = []
    for mod in MODULES:
        base = root.joinpath(*mod.split("."))
        out.append(base.with_suffix(".py"))
        if base.with_suffix(".pxd").exists():
            out.append(base.with_suffix(".pxd"))
    return out


def key_files(root: Path = ROOT) -> list[Path]:
    """What a build depends on: the sources and the recipe that compiles them."""
    return [*source_files(root), root / RECIPE]


def source_key(root: Path = ROOT) -> str:
    """A hash of the sources, the build recipe and the interpreter ABI a build is for: the name of its folder."""
    h = hashlib.sha256()
    h.update(f"{sys.implementation.cache_tag} {sysconfig.get_config_var('EXT_SUFFIX')}\n".encode())
    for path in key_files(root):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()[:20]


def cache_root() -> Path:
    """The folder that holds the builds (one subfolder per source key)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else default_cache_dir() / "speedups"


def build_dir(key: Optional[str] = None, cache: Optional[Path] = None) -> Path:
    """The folder a build of the current sources lives in (it may not exist), under ``cache`` or ``cache_root()``."""
    return (cache or cache_root()) / (key or source_key())


def built(key: Optional[str] = None, cache: Optional[Path] = None) -> Optional[dict[str, Path]]:
    """The compiled module files of the build for ``key`` (default: the current sources), None if it is not built
    (or only in part: every module must be there, or none is used)."""
    d = build_dir(key, cache)
    try:
        manifest = json.loads((d / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    files = {m: d / f for m, f in manifest.get("modules", {}).items()}
    if manifest.get("key") != d.name or set(files) != set(MODULES) or not all(p.is_file() for p in files.values()):
        return None
    return files


class _CompiledFinder(importlib.abc.MetaPathFinder):
    """Serves ``MODULES`` from a build's files, ahead of the ``.py`` sources."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files

    def find_spec(self, name, path=None, target=None):
        f = self.files.get(name)
        if f is None:
            return None
        loader = importlib.machinery.ExtensionFileLoader(name, str(f))
        return importlib.util.spec_from_file_location(name, str(f), loader=loader)


def install() -> bool:
    """Put the build of the current sources ahead of them on the import path; False (and a warning) when there is
    none or a module already loaded as Python. Called by ``vidur/__init__.py`` when ``enabled()``."""
    if any(isinstance(f, _CompiledFinder) for f in sys.meta_path):
        return True
    loaded = [m for m in MODULES if m in sys.modules]
    if loaded:
        warnings.warn(f"{ENV}: {', '.join(loaded)} already imported as Python; the compiled build is not used",
                      RuntimeWarning, stacklevel=2)
        return False
    try:
        files = built()
    except OSError:
        files = None
    if files is None:
        warnings.warn(f"{ENV} is set but the compiled build is missing or older than the sources; running plain "
                      f"Python (build it: python -m vidur.speedups build)", RuntimeWarning, stacklevel=2)
        return False
    sys.meta_path.insert(0, _CompiledFinder(files))
    return True


def active() -> bool:
    """Whether this process runs the compiled engine (``vidur.engine`` loaded from a build): runs record it."""
    mod = sys.modules.get("vidur.engine")
    f = getattr(mod, "__file__", None) or ""
    return f.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


__all__ = ["CACHE_ENV", "ENV", "MODULES", "active", "build_dir", "built", "cache_root", "enabled", "install",
           "key_files", "source_files", "source_key"]
