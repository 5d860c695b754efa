"""``python -m vidur.execution_model``: the held-out report (``vidur.execution_model.report``)."""

from vidur.execution_model.report import main

main()
