# Cython declarations for the optional compiled simulator (vidur/speedups.py): this module's code, compiled, reads the
# fields of the engine's native classes directly where its annotations name them; the trajectory is a native class.
from vidur.engine cimport Engine, Seq


cdef class Trajectory:
    cdef public Engine s
    cdef public bint eager, unsure, overlays
    cdef public long long overlaid
    cdef public long long _asked, version
    cdef public object rule, _base, future
    cdef public Seq back

    cpdef _step(self, double until)
    cpdef Engine reach(self, double t)
    cpdef object closed(self, double t, Seq seq)
