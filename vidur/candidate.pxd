# Cython declarations for the optional compiled simulator (vidur/speedups.py; see vidur/engine.pxd): the recorded
# future and its step-shape recorder become native classes with typed fields, and the walk's integer and time
# locals C integers and doubles (``cython.locals``: plain Python never reads this file).
cimport cython

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

    @cython.locals(bs=cython.longlong, wm=cython.longlong, budget=cython.longlong, k=cython.longlong,
                   j=cython.longlong, now=cython.double, g=cython.longlong, known=cython.longlong,
                   need=cython.longlong, comp=cython.longlong, left=cython.longlong, nc=cython.longlong,
                   B=cython.longlong, x=cython.longlong, m=cython.longlong, steps=cython.longlong,
                   si=cython.longlong, sd=cython.longlong, free0=cython.longlong, first=cython.bint,
                   evicted=cython.bint, rb=cython.double, ra=cython.double, c1=cython.double, k1=cython.double,
                   S1=cython.longlong)
    cpdef object _life(self, long long n, double t_n, double t, long long prompt, long long out)

    @cython.locals(target=cython.longlong, e=cython.longlong, theta=cython.longlong, sk=cython.double,
                   i=cython.longlong, hold=list)
    cpdef tuple _skip_runs(self, long long k, long long g, double now, long long prompt, long long out)

    @cython.locals(fast=cython.bint, preempted=cython.bint, n0=cython.longlong, t0=cython.double,
                   free0=cython.longlong, B=cython.longlong, d0=cython.longlong, S1=cython.longlong,
                   r0=cython.longlong, left=cython.longlong, c=cython.double, k=cython.double, a=cython.double,
                   c1=cython.double, k1=cython.double, m=cython.longlong, A=cython.double, K=cython.double,
                   free_last=cython.longlong)
    cpdef bint extend(self)

    @cython.locals(n0=cython.longlong, m=cython.longlong, B=cython.longlong, S1=cython.longlong,
                   free0=cython.longlong, free_last=cython.longlong, A=cython.double, K=cython.double,
                   c1=cython.double, k1=cython.double, hold=cython.double)
    cpdef _push(self, tuple seg)

    @cython.locals(bs=cython.longlong, wm=cython.longlong, budget=cython.longlong, k=cython.longlong,
                   j=cython.longlong, now=cython.double, g=cython.longlong, hit=cython.longlong,
                   known=cython.longlong, need=cython.longlong, comp=cython.longlong, left=cython.longlong,
                   nc=cython.longlong, B=cython.longlong, x=cython.longlong, m=cython.longlong, steps=cython.longlong,
                   fj=cython.longlong,
                   c0=cython.longlong, own0=cython.longlong, B1=cython.longlong,
                   free1=cython.longlong, free0=cython.longlong, free=cython.longlong, S1=cython.longlong,
                   end=cython.longlong, n0=cython.longlong, kv=cython.longlong, i=cython.longlong,
                   dt=cython.double, a=cython.double, b=cython.double, c1=cython.double, k1=cython.double,
                   c2=cython.double, k2=cython.double, shift=cython.double, first=cython.bint,
                   evicted=cython.bint, preempted=cython.bint, f=Future)
    cpdef object overlay(self, long long n, double t_n, long long prompt, long long out, long long version)


@cython.locals(fj=cython.longlong, own0=cython.longlong, r=cython.longlong, x=cython.longlong)
cpdef list _cum_from(list cum, long long j, long long B, long long bs, long long c0)


@cython.locals(B=cython.longlong, free0=cython.longlong, S1=cython.longlong, c=cython.double, k=cython.double,
               a=cython.double)
cpdef tuple _rest(tuple seg, long long j, double t0, bint keep_room, bint pre, long long bs)


@cython.locals(x=cython.longlong, lo=cython.longlong, hi=cython.longlong, mid=cython.longlong)
cpdef long long _steps_before_eviction(long long free0, long long B, list cum, long long j, long long steps,
                                       long long known, long long bs)

cpdef long long _decode_stop(tuple seg, long long j)
