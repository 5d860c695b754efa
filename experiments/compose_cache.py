"""A disk cache of Hydra's config composition: the same command line on the same config files composes once.

Why: composing a run's config costs 90-110 ms on the 2-core VM (Hydra parses some twenty YAML files, builds the
defaults tree and deep-copies OmegaConf nodes many times over), a sixth of the whole process of a 10,000-request
simulated run, and a basic-launcher sweep composes once per job. Loading the same composed config back from a pickle
takes about 1 ms.

What a composition depends on, and so what an entry is checked against before it is used:

* the call: config name, overrides, run mode, ``from_shell``, whether sweep overrides are validated;
* Hydra's and OmegaConf's versions, Hydra's ``version_base``, the working directory and the job name (Hydra writes
  the last three into ``hydra.runtime`` / ``hydra.job``); these and the initial search path make the entry's key;
* the contents of every config source the composition read (``hydra.runtime.config_sources``: with
  ``hydra.searchpath`` more than the initial ones): each file under a ``file://`` or ``pkg://`` source, and every
  structured config in Hydra's ConfigStore for ``structured://``. The entry records one digest per source and is
  used only if every digest still matches, so an edited YAML file, a new preset or an installed launcher plugin
  means composing again;
* the variables ``hydra.job.env_copy`` copies from the environment: a config that names any is not cached.

A config that sets a secret key (``mode.token``, which the run then refuses) is not cached either: secrets never
land in a file.

Interpolations (``${now:...}``, ``${oc.env:...}``, ``${run_dirname:}``) are not resolved by composition, so an entry
holds them unresolved and each run resolves them itself. Warnings the composition raised are recorded and raised
again on a hit. A failed composition is never cached: it runs (and raises) every time. Anything unusual (a source
that is not a folder on disk, an unreadable, corrupt or foreign entry, a config that cannot be pickled) means:
compose as Hydra does. The cache is a private patch of Hydra's ``ConfigLoaderImpl.load_configuration`` (as
``experiments.run`` already patches its mode probe and sweep validation), installed by the commands
(``python -m experiments.run``, ``python -m experiments.capacity``, ``--dry-run``) and by experiments.run's task
function, so that a launcher's worker process composes its later jobs through it (not its first: it composes that
one before our code runs); importing a module installs nothing.

Entries live in ``<cache dir>/compose/`` (``$XDG_CACHE_HOME/block-repro``; ``BLOCK_REPRO_COMPOSE_CACHE_DIR``
overrides the folder), at most ``MAX_ENTRIES`` of them (the least recently used go first).
``BLOCK_REPRO_COMPOSE_CACHE=0`` turns the cache off.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from vidur.cache import default_cache_dir

FORMAT = 1  # bump when an entry's layout or what the key covers changes
MAX_ENTRIES = 400  # about 25 KB each
MAX_TREE_FILES = 2_000  # a config source bigger than this is not cached (the project's conf/ has under 100 files)
MAX_TREE_BYTES = 16 << 20
ENV_SWITCH = "BLOCK_REPRO_COMPOSE_CACHE"
ENV_DIR = "BLOCK_REPRO_COMPOSE_CACHE_DIR"


@dataclass
class Stats:
    """What the cache did in this process (tests and ``benchmarks.phases`` read it)."""

    hits: int = 0
    misses: int = 0
    uncacheable: int = 0
    reasons: list[str] = field(default_factory=list)  # why a lookup missed or could not be cached


STATS = Stats()


def cache_dir() -> Path:
    return Path(os.environ.get(ENV_DIR) or default_cache_dir() / "compose")


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


# ---------------------------------------------------------------------- digests of the config sources
def _tree_digest(roots: list[str]) -> Optional[str]:
    """Names and contents of every file below ``roots`` (bytecode caches left out; linked folders followed, as Hydra
    reads through them); None if a root is no folder or the tree is beyond ``MAX_TREE_FILES`` / ``MAX_TREE_BYTES``
    (a search path pointed at a big folder: reading it on every run would cost more than composing)."""
    h = hashlib.sha256()
    files = size = 0
    for root in roots:
        if not os.path.isdir(root):
            return None
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for name in sorted(filenames):
                if name.endswith((".pyc", ".pyo")):
                    continue
                path = os.path.join(dirpath, name)
                with open(path, "rb") as f:
                    data = f.read(MAX_TREE_BYTES - size + 1)
                files, size = files + 1, size + len(data)
                if files > MAX_TREE_FILES or size > MAX_TREE_BYTES:
                    return None
                h.update(os.path.relpath(path, root).encode() + b"\0" + data + b"\0")
    return h.hexdigest()


def _package_dirs(module: str) -> Optional[list[str]]:
    import importlib.util

    try:
        spec = importlib.util.find_spec(module.replace("/", "."))
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)


def _config_store_digest() -> str:
    """Every structured config registered in Hydra's ConfigStore (Hydra's own, launcher plugins', ours)."""
    from hydra.core.config_store import ConfigStore

    h = hashlib.sha256()

    def walk(node: dict, prefix: str) -> None:
        for name in sorted(node):
            item = node[name]
            if isinstance(item, dict):
                walk(item, f"{prefix}{name}/")
            else:
                h.update(f"{prefix}{name}\0{item.group}\0{item.package}\0{item.provider}\0{item.node}\0".encode())

    walk(ConfigStore.instance().repo, "")
    return h.hexdigest()


def source_digest(scheme: str, path: str) -> Optional[str]:
    """The digest of one config source's contents; None when it cannot be read as files on disk."""
    try:
        if scheme == "file":
            return _tree_digest([path])
        if scheme == "pkg":
            dirs = _package_dirs(path)
            return None if dirs is None else _tree_digest(dirs)
        if scheme == "structured":
            return _config_store_digest()
    except OSError:
        return None
    return None


# ---------------------------------------------------------------------- entries
def _key(loader: Any, config_name: Optional[str], overrides: list[str], run_mode: Any, from_shell: bool,
         validate: bool) -> str:
    import hydra
    import omegaconf
    from hydra import version
    from hydra.core.utils import JobRuntime

    job_name = None
    with contextlib.suppress(KeyError):
        job_name = JobRuntime.instance().get("name")  # what composition writes into hydra.job.name
    material = {
        "format": FORMAT, "hydra": hydra.__version__, "omegaconf": omegaconf.__version__,
        "version_base": str(version.getbase()), "config_name": config_name, "overrides": list(overrides),
        "run_mode": getattr(run_mode, "name", str(run_mode)), "from_shell": bool(from_shell),
        "validate": bool(validate), "cwd": os.getcwd(), "job_name": job_name,
        "search_path": [(s.scheme(), s.path, s.provider) for s in loader.repository.get_sources()],
    }
    return json.dumps(material, sort_keys=True)


def _entry_path(key: str) -> Path:
    return cache_dir() / f"{hashlib.sha256(key.encode()).hexdigest()[:40]}.pkl"


def _load(key: str) -> tuple[Optional[dict], str]:
    """The entry for ``key`` if it may be used now, and otherwise why not."""
    path = _entry_path(key)
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f)
    except FileNotFoundError:
        return None, "no entry"
    except Exception as err:  # noqa: BLE001 -- a corrupt or foreign entry: compose instead
        return None, f"unreadable entry ({type(err).__name__})"
    if not isinstance(entry, dict) or entry.get("key") != key or not {"sources", "warnings", "cfg"} <= entry.keys():
        return None, "foreign entry"
    try:
        for scheme, src_path, digest in entry["sources"]:
            if source_digest(scheme, src_path) != digest:
                return None, f"{scheme}://{src_path} changed"
    except (TypeError, ValueError):  # not the (scheme, path, digest) triples this module writes
        return None, "foreign entry"
    with contextlib.suppress(OSError):
        os.utime(path)  # least recently used goes first
    return entry, "hit"


Recorded = list[tuple[str, type, str, int]]  # warnings as (message, category, filename, lineno)


def _store(key: str, cfg: Any, recorded: Recorded) -> Optional[str]:
    """Write the entry for ``key``; the reason when it cannot be cached."""
    from omegaconf import OmegaConf

    sources = []
    for info in OmegaConf.select(cfg, "hydra.runtime.config_sources", default=None) or []:
        scheme, src_path = str(info.schema), str(info.path)
        digest = source_digest(scheme, src_path)
        if digest is None:
            return f"{scheme}://{src_path} is no folder on disk, or too big to read on every run"
        sources.append((scheme, src_path, digest))
    if not sources:
        return "no config sources recorded"
    if OmegaConf.select(cfg, "hydra.job.env_copy", default=None):
        return "hydra.job.env_copy is set (environment values are not written to the cache)"
    from experiments.schema import secret_keys_in

    if secret_keys_in(cfg):  # the run refuses it (ConfigGuard); the cache must not have written it first
        return "the config sets a secret key"
    entry = {"key": key, "sources": sources, "warnings": recorded, "cfg": cfg}
    try:
        data = pickle.dumps(entry, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as err:  # noqa: BLE001 -- a config holding something unpicklable
        return f"cannot pickle the config ({type(err).__name__})"
    from vidur.records import write_atomic

    try:
        write_atomic(_entry_path(key), data)
        _prune()
    except OSError as err:
        return f"cannot write the cache ({err.strerror})"
    return None


def _prune() -> None:
    """Keep the ``MAX_ENTRIES`` most recently used entries."""
    folder = cache_dir()
    entries = []
    for path in folder.glob("*.pkl"):
        with contextlib.suppress(OSError):
            entries.append((path.stat().st_mtime_ns, path))
    if len(entries) <= MAX_ENTRIES:
        return
    entries.sort()
    for _, path in entries[:len(entries) - MAX_ENTRIES]:
        with contextlib.suppress(OSError):
            path.unlink()


def _replay(recorded: Recorded) -> None:
    for message, category, filename, lineno in recorded:
        warnings.warn_explicit(message, category, filename, lineno)


def cached(compose: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``ConfigLoaderImpl.load_configuration`` with the cache."""

    def load_configuration(self: Any, config_name: Optional[str], overrides: list[str], run_mode: Any,
                           from_shell: bool = True, validate_sweep_overrides: bool = True) -> Any:
        if not enabled():
            return compose(self, config_name, overrides, run_mode, from_shell, validate_sweep_overrides)
        key: Optional[str] = None
        entry: Optional[dict] = None
        try:  # the cache must never be why a run fails: any error here means composing as Hydra does
            key = _key(self, config_name, overrides, run_mode, from_shell, validate_sweep_overrides)
            entry, why = _load(key)
        except Exception as err:  # noqa: BLE001
            entry, why = None, f"lookup failed ({type(err).__name__})"
        if entry is not None:
            STATS.hits += 1
            _replay(entry["warnings"])
            return entry["cfg"]
        STATS.reasons.append(why)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cfg = compose(self, config_name, overrides, run_mode, from_shell, validate_sweep_overrides)
        recorded = [(str(w.message), w.category, w.filename, w.lineno) for w in caught]
        _replay(recorded)
        try:
            problem = "lookup failed" if key is None else _store(key, cfg, recorded)
        except Exception as err:  # noqa: BLE001
            problem = f"store failed ({type(err).__name__})"
        if problem is None:
            STATS.misses += 1
        else:
            STATS.uncacheable += 1
            STATS.reasons.append(problem)
        return cfg

    load_configuration.compose_cache = True  # type: ignore[attr-defined]
    load_configuration.uncached = compose  # type: ignore[attr-defined]
    return load_configuration


def install() -> None:
    """Patch Hydra's composition with the cache in this process (idempotent)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    if getattr(ConfigLoaderImpl.load_configuration, "compose_cache", False):
        return
    ConfigLoaderImpl.load_configuration = cached(ConfigLoaderImpl.load_configuration)  # type: ignore[method-assign]


def uninstall() -> None:
    """Undo :func:`install` (tests)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    original = getattr(ConfigLoaderImpl.load_configuration, "uncached", None)
    if original is not None:
        ConfigLoaderImpl.load_configuration = original  # type: ignore[method-assign]


__all__ = ["STATS", "cache_dir", "cached", "enabled", "install", "source_digest", "uninstall"]
