"""Run directory names: Hydra's ``override_dirname`` with path values shortened, one flat folder per run.

Hydra names a run ``key=value,...`` from its command-line overrides, so ``dataset.path=/data/traces/my.csv`` made
nested folders ``.../dataset.path=/data/traces/my.csv`` that mirror the user's file system. Here a value that is a
path (it holds a ``/``) becomes ``<file stem>-<8 hex of sha1(absolute path)>``: readable, flat, and still one
directory per file (two ``trace.csv`` in different folders differ by the hash). A name over 200 bytes keeps its
start plus a hash of the whole. Everything else is exactly Hydra's ``override_dirname`` (sorted items,
``exclude_keys`` dropped), so existing run directories keep their names.

conf/config.yaml uses it as ``${run_dirname:}`` in ``hydra.run.dir`` and ``hydra.sweep.subdir``; the sweep progress
bar (``experiments.logger``) and the capacity search (``experiments.capacity``) call ``run_dirname`` to find the
directories of runs they did not start themselves. Importing this module registers the resolver.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Sequence

from omegaconf import OmegaConf

RESOLVER = "run_dirname"
MAX_NAME_BYTES = 200  # below the usual 255-byte limit of one path component, with room for a suffix


def short_path(value: str) -> str:
    """``/data/traces/my trace.csv`` -> ``my_trace-1a2b3c4d`` (stem, then a hash of the absolute path)."""
    p = Path(value).expanduser()
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(p.name.removesuffix(".gz")).stem) or "path"
    digest = hashlib.sha1(str(p.absolute()).encode()).hexdigest()[:8]
    return f"{stem}-{digest}"


def _item(override) -> str:
    """One ``key=value`` item as typed, or ``key=<stem>-<hash>`` when the (parsed) value is a path."""
    line = str(override.input_line)
    try:
        value = override.value()
    except Exception:  # noqa: BLE001 - a sweep or interpolation: keep Hydra's text
        value = None
    if isinstance(value, str) and "/" in value:
        return f"{line.partition('=')[0]}={short_path(value)}"
    return line


def run_dirname(overrides: Sequence[str], exclude_keys: Sequence[str] = (), item_sep: str = ",",
                kv_sep: str = "=") -> str:
    """The run directory name of one job's overrides (Hydra's ``get_overrides_dirname`` plus ``short_path``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    lines = sorted(_item(o) for o in parsed if o.key_or_group not in set(exclude_keys))
    return _capped(re.sub("[=]", kv_sep, item_sep.join(lines)))


def _capped(name: str) -> str:
    """A name longer than ``MAX_NAME_BYTES`` keeps its start and gets a hash of the whole: file systems refuse
    components over 255 bytes, and a long sweep's overrides exceed that once paths no longer split them."""
    raw = name.encode()
    if len(raw) <= MAX_NAME_BYTES:
        return name
    head = raw[:MAX_NAME_BYTES - 9].decode(errors="ignore").rstrip(",=")
    return f"{head}-{hashlib.sha1(raw).hexdigest()[:8]}"


def current_run_dirname() -> str:
    """``${run_dirname:}``: the name for the job Hydra is setting up (its task overrides and dirname settings)."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    od = hc.job.config.override_dirname
    return run_dirname(list(hc.overrides.task), list(od.exclude_keys), str(od.item_sep), str(od.kv_sep))


if not OmegaConf.has_resolver(RESOLVER):
    OmegaConf.register_new_resolver(RESOLVER, current_run_dirname)
