# Cython declarations for the optional compiled simulator (vidur/speedups.py): this module's code, compiled, reads the
# fields of the engine's native classes directly where its annotations name them, and its integer locals are C
# integers (``cython.locals``: plain Python never reads this file).
cimport cython

from vidur.engine cimport Engine, Seq


cdef class V0Rule:
    cdef public object advance, settle
    cdef public bint chunked, closed_form

    @cython.locals(ahead=cython.longlong, free=cython.longlong, dn=cython.longlong, left=cython.longlong,
                   bs=cython.longlong, wm=cython.longlong, never=cython.longlong, max_len=cython.longlong,
                   i=cython.longlong, known=cython.longlong, need=cython.longlong)
    cpdef bint may_reach_back(self, Engine e)


cpdef _settle_chunked(Engine e)
cpdef _settle_nothing(Engine e)
@cython.locals(bs=cython.longlong, known=cython.longlong, need=cython.longlong, n=cython.longlong)
cpdef list _admit(Engine e, long long budget, long long seqs_room, bint whole)
@cython.locals(need=cython.longlong, budget=cython.longlong, n=cython.longlong)
cpdef _advance_chunked(Engine e, double until)
cpdef _advance_prefill_first(Engine e, double until)
