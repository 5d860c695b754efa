"""Our Vidur-style simulator: execution-time model, vLLM engine scheduler, what-if, cluster loop, run records.

Imports go down only: this package uses third-party libraries and itself, nothing else of the project.
"""
