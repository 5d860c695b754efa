# Declarations for the compiled build (vidur.speedups; docs/simulator.md): the execution model as a native class
# whose step-time tables are typed fields, so that step_time and decode_coeffs, called by the engines at every step,
# read them as C struct members instead of looking them up in an instance dict. Its methods stay ``def``s (the
# engines call any ``StepTimeModel``); ``__dict__`` keeps every other attribute (params, specs, cache path, ...) as
# a Python class has them. model.py stays the source and the arithmetic is the same Python-float arithmetic in the
# same order, so a compiled model gives the same step times bit for bit.


cdef class ExecutionModel:
    cdef dict __dict__
    cdef public list _tok, _pa0, _pa1, _pb, _da, _dk, _dc
    cdef public object _pfloor, _cpu
