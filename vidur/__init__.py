"""Our Vidur-style simulator: execution-time model, vLLM engine scheduler, what-if, cluster loop, run records.

Imports go down only: this package uses third-party libraries and itself, nothing else of the project.
"""

import os as _os

if _os.environ.get("BLOCK_REPRO_SPEEDUPS"):  # the compiled build, when asked for (vidur/compiled.py)
    from vidur import compiled as _compiled

    if _compiled.enabled():
        _compiled.install()
