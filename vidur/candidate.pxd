# Cython declarations for the optional compiled simulator (vidur/speedups.py; see vidur/engine.pxd): the recorded
# future and its step-shape recorder become native classes with typed fields.
from vidur.engine cimport Engine, Seq


cdef class _LastStep:
    cdef public object model
    cdef public tuple last


cdef class Future:
    cdef public Engine e
    cdef public Seq back
    cdef public object model, rule
    cdef public _LastStep rec
    cdef public bint fast_runs, done
    cdef public long long version, end, bs, budget, total, wm, max_len, hits, falls, p0
    cdef public list segs, starts, sa, sk, skp, hold
