"""Response-length estimation: train, evaluate, tag and serve predictors of the serving model's output length.

Layer rule (DESIGN.md): this package imports third-party libraries and ``vidur`` types only, never ``block``.
"""
