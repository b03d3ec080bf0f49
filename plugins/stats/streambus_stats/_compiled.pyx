# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""The aggregator's per-event path and the distributions' batch digest, compiled.

A mirror of pure Python that stays the behaviour reference: :class:`Live` and
:func:`feed` of ``_aggregator.py`` (its ``Live`` and the loop of
``StatsAggregator.feed_many``), :func:`digest` of ``_distribution.py``. Change
them together; the tests feed both the same events and values and demand
identical results. Only public interfaces are used: a delta's fields are read
as attributes (as Python code reads them), the sketch's bins come from
``LogarithmicMapping``'s documented ``key`` and ``gamma``. What is compiled is
the work around those reads: the loop, the gap arithmetic, and a batch's sort,
sums, bucket and bin counts in C.
"""

from cpython.float cimport PyFloat_AS_DOUBLE
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.object cimport PyObject
from libc.math cimport INFINITY, ceil, fabs, log, pow, rint
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport qsort

import inspect
import sys
import types

from streambus.events import DeltaEvent

cdef extern from "Python.h":
    PyObject *PyDict_GetItemWithError(object d, object key) except? NULL
    bint Py_UNICODE_ISALNUM(Py_UCS4 ch)
    bint Py_UNICODE_ISSPACE(Py_UCS4 ch)
    bint PyUnicode_IS_ASCII(object text)
    bint PyUnicode_CheckExact(object text)
    void *PyUnicode_DATA(object text)
    Py_ssize_t PyUnicode_GET_LENGTH(object text)

ctypedef object (*descrgetfunc)(object, object, object)

cdef extern from "Python.h":
    ctypedef struct PyTypeObject:
        descrgetfunc tp_descr_get
    PyTypeObject *Py_TYPE(object o)


cdef class _Field:
    """Reads one field of a delta through its class's descriptor, as ``event.<name>`` does.

    Attribute access finds the field's descriptor in the class (the type's attribute cache) and
    calls its ``__get__``; this keeps the descriptor and calls its ``__get__`` slot directly
    (the descriptor protocol, the same public path), skipping the look-up on every read.
    """

    cdef object descr
    cdef descrgetfunc get

    def __init__(self, str name):
        descr = inspect.getattr_static(DeltaEvent, name)
        kind = type(descr)
        get = (<PyTypeObject *>kind).tp_descr_get
        if type(descr) is not types.MemberDescriptorType or get is NULL:
            raise ImportError(f"DeltaEvent.{name} is not a plain field ({type(descr).__name__})")
        self.descr = descr
        self.get = get

    cdef inline object of(self, object event):
        return self.get(self.descr, event, DELTA)


cdef object ONE = 1
cdef object DELTA = DeltaEvent
cdef double NANO = 1e9
cdef double LARGEST = sys.float_info.max / 1_000_000_000  # as _distribution._LARGEST
cdef double SURELY_BELOW = 1 - 1e-9
cdef double SURELY_ABOVE = 1 + 1e-9
cdef _Field STREAM = _Field("stream")
cdef _Field TEXT = _Field("text")
cdef _Field TS = _Field("ts")
cdef _Field N = _Field("n")
cdef double EXACT = 4611686018427387904.0  # 2 ** 62: rint() of a smaller double fits an int64, and so does a sum of two


cdef class Live:
    """What the aggregator tracks of a stream between its start and its terminal event (see ``_aggregator.Live``)."""

    cdef public object start, agg, gaps, texts, moderation, first, first_content, first_ts, last, gap_max
    cdef public Py_ssize_t empty, extra
    cdef public object first_n

    def __init__(self, start, agg):
        self.start = start
        self.agg = agg
        self.gaps = agg.pending["inter_chunk_latency_seconds"]
        self.texts = []
        self.moderation = {}
        self.empty = 0
        self.extra = 0
        self.first = None
        self.first_content = None
        self.first_ts = None
        self.first_n = 0
        self.last = None
        self.gap_max = -INFINITY

    @property
    def chunks(self):
        """Chunks so far (a coalesced delta counts its ``n``)."""
        return len(self.texts) + self.extra

    @property
    def ngaps(self):
        """Gaps so far: one per chunk after the first delta's."""
        return self.chunks - self.first_n if self.first_ts is not None else 0

    @property
    def gap_sum(self):
        """The sum of the gaps (raw, before clamping): the span from first to latest chunk."""
        if self.first_ts is None or self.last is None:
            return 0.0
        return self.last - self.first_ts

    cpdef chunk(self, event):
        """Account for a non-empty delta (:func:`feed` does the commonest case itself)."""
        self.texts.append(event.text)
        ts, n = event.ts, event.n
        if n != 1:
            self.extra += n - 1
        if event.channel != "tool":
            if self.first is None:
                self.first = ts
                self.agg.pending["time_to_first_chunk_seconds"].append(ts - self.start.ts)
            if self.first_content is None and event.channel == "content":
                self.first_content = ts
                self.agg.pending["time_to_first_content_seconds"].append(ts - self.start.ts)
        last, self.last = self.last, ts
        if last is None:
            self.first_ts, self.first_n = ts, n
            return
        if n < 1:
            return
        gap = ts - last if n == 1 else (ts - last) / n
        self.gaps.extend([gap] * n)
        if gap > self.gap_max:
            self.gap_max = gap


cdef enum:
    SLOT_BITS = 9
    SLOTS = 1 << SLOT_BITS  # the cache of stream ids


cdef struct Slot:
    PyObject *stream  # borrowed: the events of the batch hold their ids
    PyObject *live  # borrowed: the live dict holds it, and only `other` changes that dict
    size_t epoch  # the slot holds only while this is the running epoch


cdef inline size_t _slot_of(PyObject *stream) noexcept nogil:
    """The cache slot of an id: Fibonacci hashing of its address.

    Ids made one after another sit a fixed 64 bytes apart, so the address's low bits alone
    put 100 streams on 16 slots (measured: nearly every delta then missed the cache).
    """
    return <size_t>((<uint64_t><size_t>stream * <uint64_t>11400714819323198485ULL) >> (64 - SLOT_BITS))


cdef Slot CACHE[SLOTS]
cdef size_t EPOCH = 0  # the last epoch given out: one per feed call, and a new one after each `other`


def feed(object events, dict live, object other):
    """Account for *events* in order, as ``StatsAggregator.feed_many`` does; return the orphan events.

    Deltas are handled here; every other event goes to *other* (the aggregator's own method).
    A stream's deltas usually carry the very same id object (its writer's), so the id's
    ``Live`` is remembered by the id's identity in a cache of slots, and looked up in *live*
    again only for another object or after *other* ran (which may start or finish streams).
    A slot holds only within the epoch that filled it: each call takes a new epoch, and a new
    one after each *other*, so no slot is ever cleared and none outlives the stretch of
    deltas it was filled in.
    """
    global EPOCH
    cdef Py_ssize_t orphans = 0
    cdef PyObject *found
    cdef Slot *slot
    cdef Live st
    cdef double gap
    EPOCH += 1
    cdef size_t epoch = EPOCH
    for event in events:
        if type(event) is not DELTA:
            other(event)
            EPOCH += 1
            epoch = EPOCH
            continue
        stream = STREAM.of(event)
        slot = &CACHE[_slot_of(<PyObject *>stream)]
        if slot.stream is <PyObject *>stream and slot.epoch == epoch:
            found = slot.live
        else:
            found = PyDict_GetItemWithError(live, stream)
            if found is NULL:
                orphans += 1
                continue
            slot.stream = <PyObject *>stream
            slot.live = found
            slot.epoch = epoch
        if Py_TYPE(<object>found) is not <PyTypeObject *>Live:
            raise TypeError(f"live stream {stream!r}: {type(<object>found).__name__} is not a compiled Live")
        st = <Live><object>found
        text = TEXT.of(event)
        if PyUnicode_CheckExact(text):
            if PyUnicode_GET_LENGTH(text) == 0:
                st.empty += 1
                continue
        elif not text:
            st.empty += 1
            continue
        n = N.of(event)
        if st.first_content is None or (n is not ONE and n != 1):
            st.chunk(event)
            continue
        ts = TS.of(event)
        last = st.last
        if type(ts) is not float or type(last) is not float:
            st.chunk(event)  # (the generic arithmetic: a ts that is an int, say)
            continue
        # The commonest event by far: one more chunk of a stream that has its first content.
        st.texts.append(text)
        gap = PyFloat_AS_DOUBLE(ts) - PyFloat_AS_DOUBLE(last)
        st.last = ts
        value = gap
        st.gaps.append(value)
        gap_max = st.gap_max
        if type(gap_max) is float:
            if gap > PyFloat_AS_DOUBLE(gap_max):
                st.gap_max = value
        elif value > gap_max:
            st.gap_max = value
    return orphans


cdef void _sort(double *a, Py_ssize_t n, int depth) noexcept nogil:
    """Sort *a* ascending: quicksort (median of three, the smaller side first), insertion sort for short runs.

    Past *depth* levels (an unlucky or crafted input) the rest goes to libc's ``qsort``.
    """
    cdef Py_ssize_t i, j, lo
    cdef double pivot, t
    while n > 16:
        if depth == 0:
            qsort(a, n, sizeof(double), _compare)
            return
        depth -= 1
        # Median of three to a[0]
        i = n >> 1
        if a[i] < a[0]:
            t = a[i]; a[i] = a[0]; a[0] = t
        if a[n - 1] < a[0]:
            t = a[n - 1]; a[n - 1] = a[0]; a[0] = t
        if a[n - 1] < a[i]:
            t = a[n - 1]; a[n - 1] = a[i]; a[i] = t
        pivot = a[i]
        i = 0
        j = n - 1
        while True:  # Hoare partition
            while a[i] < pivot:
                i += 1
            while pivot < a[j]:
                j -= 1
            if i >= j:
                break
            t = a[i]; a[i] = a[j]; a[j] = t
            i += 1
            j -= 1
        lo = j + 1  # a[:lo] <= pivot <= a[lo:]
        if lo < n - lo:
            _sort(a, lo, depth)
            a += lo
            n -= lo
        else:
            _sort(a + lo, n - lo, depth)
            n = lo
    for i in range(1, n):
        t = a[i]
        j = i - 1
        while j >= 0 and t < a[j]:
            a[j + 1] = a[j]
            j -= 1
        a[j + 1] = t


cdef int _compare(const void *a, const void *b) noexcept nogil:
    cdef double x = (<const double *>a)[0]
    cdef double y = (<const double *>b)[0]
    return (x > y) - (x < y)


cdef Py_ssize_t _after(const double *ordered, Py_ssize_t lo, Py_ssize_t hi, double x) noexcept nogil:
    """``bisect_right(ordered, x, lo, hi)``."""
    cdef Py_ssize_t mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if x < ordered[mid]:
            hi = mid
        else:
            lo = mid + 1
    return lo


cdef object _key(double value, object key_of, double gamma, double log_gamma):
    """The mapping's key of *value*, read off the bin edges when it lies surely inside a bin.

    A bin ``k`` holds the values in ``(gamma ** (k - 1), gamma ** k]`` (what the reference's walk
    from one bin to the next relies on too); a value within 1e-9 of an edge, relatively, is
    left to the mapping's own ``key``, as everywhere else.
    """
    cdef double k = ceil(log(value) / log_gamma)
    cdef double upper = pow(gamma, k)
    if upper / gamma * SURELY_ABOVE < value < upper * SURELY_BELOW and fabs(k) < 1e15:
        return int(k)
    return key_of(value)


cdef unsigned char KIND[128]  # per ASCII character: 0 space, 1 word (\\w), 2 other
cdef Py_UCS4 _c
for _c in range(128):
    KIND[_c] = 1 if (_c == 95 or Py_UNICODE_ISALNUM(_c)) else (0 if Py_UNICODE_ISSPACE(_c) else 2)


def approximate_tokens(str text):
    """The C twin of ``_tokens.count_pieces``: ``ceil(len / 4)`` per ``\\w+`` run, 1 per other non-space character.

    ``\\w`` and ``\\s`` are what the ``re`` module means by them in a str pattern:
    ``Py_UNICODE_ISALNUM`` or ``_``, and ``Py_UNICODE_ISSPACE``.
    """
    cdef Py_ssize_t run = 0, count = 0, i
    cdef Py_UCS4 ch
    cdef const unsigned char *ascii
    cdef unsigned char kind
    if PyUnicode_IS_ASCII(text):
        ascii = <const unsigned char *>PyUnicode_DATA(text)
        for i in range(PyUnicode_GET_LENGTH(text)):
            kind = KIND[ascii[i]]
            if kind == 1:
                run += 1
                continue
            if run:
                count += (run + 3) >> 2
                run = 0
            count += kind >> 1
        return count + ((run + 3) >> 2)
    for ch in text:
        if ch == 95 or Py_UNICODE_ISALNUM(ch):  # (95: "_")
            run += 1
            continue
        if run:
            count += (run + 3) >> 2
            run = 0
        if not Py_UNICODE_ISSPACE(ch):
            count += 1
    return count + ((run + 3) >> 2)


def digest(list values, object bounds, object mapping, list buckets, dict keyed):
    """The C twin of ``_distribution.digest``: the same additions and tuple for the same values (or ``None``)."""
    cdef Py_ssize_t size = PyList_GET_SIZE(values)
    cdef Py_ssize_t n = 0, i, j, low, high, negative, zeros
    cdef double v, x, upper, gamma, edge
    cdef int64_t part = 0
    cdef double *ordered = <double *>PyMem_Malloc((size or 1) * sizeof(double))
    if ordered is NULL:
        raise MemoryError
    try:
        for i in range(size):
            v = <double>(<object>PyList_GET_ITEM(values, i))  # a float, or an int the way Python converts it
            if fabs(v) <= LARGEST:  # (NaN and infinities left out, as the reference does)
                ordered[n] = v
                n += 1
        if n == 0:
            return None
        _sort(ordered, n, 64)
        negative = 0
        while negative < n and ordered[negative] < 0.0:
            ordered[negative] = 0.0
            negative += 1
        # The exact sum of round(v * 1e9): in an int64 while the parts are small, else as Python ints.
        sum_nano = 0
        for i in range(n):
            x = NANO * ordered[i]
            if x < EXACT:
                part += <int64_t>rint(x)
                if part >= <int64_t>EXACT:
                    sum_nano += part
                    part = 0
            else:
                sum_nano += round(x)
        sum_nano += part
        low = 0
        i = 0
        for bound in bounds:
            high = _after(ordered, low, n, <double>bound)
            if high > low:
                buckets[i] += high - low
            low = high
            i += 1
        if n > low:
            buckets[i] += n - low
        key_of = mapping.key
        gamma = mapping.gamma
        log_gamma = log(gamma)
        i = _after(ordered, 0, n, <double>mapping.min_possible)
        zeros = i
        key = _key(ordered[i], key_of, gamma, log_gamma) if i < n else 0
        while i < n:
            upper = pow(gamma, <double>key)
            j = _after(ordered, i, n, upper * SURELY_BELOW)
            edge = upper * SURELY_ABOVE
            while j < n and ordered[j] <= edge and key_of(ordered[j]) == key:
                j += 1
            keyed[key] = keyed.get(key, 0) + (j - i)
            if j < n:
                key = key + 1 if ordered[j] < upper * gamma * SURELY_BELOW else _key(ordered[j], key_of, gamma, log_gamma)
            i = j
        return n, negative, ordered[0], ordered[n - 1], sum_nano, zeros
    finally:
        PyMem_Free(ordered)
