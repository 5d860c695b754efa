# Cython declarations for the optional compiled simulator (``python -m vidur.speedups build``; docs/simulator.md).
# engine.py stays the one source: plain Python ignores this file; the compiled build reads it beside engine.py and
# makes Seq and Engine native classes with typed fields (a field assigned in engine.py but missing here fails the
# build's own check, tests/test_speedups.py). Integers stay exact: every int field is a 64-bit C integer and Python's
# floor division and modulo are kept (cdivision off). The hot methods are ``cpdef`` (C calls between compiled modules)
# with typed locals (``cython.locals``); a ``.py`` signature they declare carries no ``int``/``bool`` annotation on a
# typed argument (Cython reads those as Python object types, which would not match the C types declared here).

cimport cython


cdef class Seq:
    cdef public object id
    cdef public long long prompt, out, expected
    cdef public object arrival
    cdef public long long computed, generated
    cdef public bint in_decode
    cdef public long long c0, d0, g0, ver
    cdef public object first_sched, first_token, finish
    cdef public long long preemptions
    cdef public object status, tag

    cpdef Seq clone(self, out=*)


cdef class Engine:
    cdef public object cfg, model, instance_id
    cdef public long long bs, total_blocks, free, watermark_blocks, budget, max_seqs
    cdef public double time
    cdef public dict running
    cdef public list prefilling
    cdef public object waiting
    cdef public long long num_preemptions, num_steps
    cdef public double busy_s
    cdef public bint keep_finished
    cdef public list finished, rejected
    cdef public long long wq_tokens, wq_blocks, wq_unprocessed
    cdef public bint wq_exact
    cdef public object room_at_reject
    cdef public long long dclock, dg_count, dg_sum
    cdef public list dg_hist, dg_heap
    cdef public object on_finish, whatif, _rule_advance
    cdef public bint _prefill_holds_known

    cpdef sample(self, double ts, list out)
    @cython.locals(k=cython.longlong, u=cython.longlong)
    cpdef queued(self, Seq s, long long sign)
    @cython.locals(off=cython.longlong)
    cpdef join_decode(self, Seq s)
    @cython.locals(off=cython.longlong)
    cpdef leave_decode(self, Seq s)
    cpdef _finish(self, Seq s, double t)
    @cython.locals(d=cython.longlong, ver=cython.longlong)
    cpdef _pop_finished(self, double t)
    cpdef long long _heap_top_clock(self)
    @cython.locals(bs=cython.longlong, need=cython.longlong)
    cpdef long long ensure_decode_blocks(self)
    @cython.locals(B=cython.longlong, kv=cython.longlong, dt=cython.double, t_end=cython.double)
    cpdef mixed_step(self, list chunks, bint with_decodes)
    @cython.locals(B=cython.longlong, m=cython.longlong, c=cython.double, k=cython.double, S1=cython.longlong,
                   t0=cython.double, a=cython.double, b=cython.double, delta=cython.double, j=cython.longlong,
                   total=cython.double)
    cpdef decode_run(self, double until)
    @cython.locals(bs=cython.longlong, q=cython.longlong, r=cython.longlong, total=cython.longlong,
                   r0=cython.longlong)
    cpdef long long _cum_need(self, long long m)
    @cython.locals(B=cython.longlong, bs=cython.longlong, free=cython.longlong, q=cython.longlong,
                   rem=cython.longlong, d=cython.longlong, r=cython.longlong, used=cython.longlong)
    cpdef long long _steps_until_blocks_run_out(self)


@cython.locals(j=cython.longlong)
cpdef long long steps_started_before(double a, double b, double delta)
@cython.locals(s=Seq, n=cython.Py_ssize_t, k=cython.Py_ssize_t, nan=cython.double, ids=cython.longlong[:],
               pre=cython.longlong[:], first=cython.double[:], finish=cython.double[:], sched=cython.double[:])
cpdef tuple outcome_columns(list seqs)
