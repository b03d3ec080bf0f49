# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""The aggregator's per-event hot path, compiled: a mirror of ``_hot.py`` (the behaviour reference).

Only ``Feeder.feed``'s fast path is here (a one-chunk delta of a stream that
already has its first content); every other delta goes to the same
:func:`streambus_stats._hot.slow_delta` the pure-Python path uses. Change
``_hot.py`` and this file together; the tests compare them figure by figure.
Beyond the mirror, three things are compiled only: the id index in front of
the live dict (``Feeder``), the gap digest (``Gaps``) and each stream's texts
in a C array (``Live``); each is described where it is defined.

What makes it fast: a delta's fields are read straight from the event's
slots, at the offsets its class's member descriptors give (looked up once, at
import, and checked: if ``DeltaEvent`` is ever not laid out as slots this
module refuses to import and the pure-Python path is used).
"""

cimport cython
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_CheckExact
from cpython.object cimport PyObject, PyTypeObject
from cpython.mem cimport PyMem_Free, PyMem_Realloc
from cpython.sequence cimport PySequence_Fast_GET_ITEM, PySequence_Fast_GET_SIZE
from cpython.ref cimport Py_DECREF, Py_INCREF, Py_TYPE, Py_XDECREF
from libc.math cimport INFINITY, llrint, log2
from libc.stdint cimport uint64_t
from libc.string cimport memcmp, memcpy, memset

import types

import numpy as np

from streambus.events import DeltaEvent

from streambus_stats._hot import slow_delta

COMPILED = True


cdef extern from "structmember.h":
    ctypedef struct PyMemberDef:
        int type
        Py_ssize_t offset
    int T_OBJECT
    int T_OBJECT_EX


cdef extern from "Python.h":
    bint PyUnicode_CheckExact(object)
    Py_ssize_t PyUnicode_GET_LENGTH(object)
    int PyUnicode_READY(object) except -1
    int PyUnicode_KIND(object)
    void *PyUnicode_DATA(object)
    ctypedef struct PyMemberDescrObject:
        PyMemberDef *d_member
    PyObject *PyDict_GetItemWithError(object d, object key) except? NULL


cdef Py_ssize_t _slot_offset(object cls, str name) except -1:
    """The offset of attribute *name* in instances of *cls*, from its member descriptor."""
    for klass in cls.__mro__:
        if name in klass.__dict__:
            descr = klass.__dict__[name]
            break
    else:
        raise ImportError(f"{cls.__name__}.{name} not found")
    if type(descr) is not types.MemberDescriptorType:
        raise ImportError(f"{cls.__name__}.{name} is not a slot ({type(descr).__name__})")
    cdef PyMemberDef *member = (<PyMemberDescrObject *>descr).d_member
    if member.type != T_OBJECT_EX and member.type != T_OBJECT:
        raise ImportError(f"{cls.__name__}.{name} is not an object slot")
    return member.offset


cdef PyTypeObject *DELTA = <PyTypeObject *>DeltaEvent
cdef Py_ssize_t STREAM = _slot_offset(DeltaEvent, "stream")
cdef Py_ssize_t TEXT = _slot_offset(DeltaEvent, "text")
cdef Py_ssize_t TS = _slot_offset(DeltaEvent, "ts")
cdef Py_ssize_t N = _slot_offset(DeltaEvent, "n")
cdef object ONE = 1


cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
    #define SB_PREFETCH(p) __builtin_prefetch((const void *)(p))
    #else
    #define SB_PREFETCH(p) ((void)0)
    #endif
    """
    void SB_PREFETCH(const void *p) noexcept


cdef enum:
    PREFETCH = 8  # how many events ahead the loop prefetches a delta's id and time


cdef inline PyObject *_slot(object obj, Py_ssize_t offset):
    return (<PyObject **>((<char *><PyObject *>obj) + offset))[0]


cdef enum:
    GAPS_BLOCK = 16384  # gaps digested between hand-overs to the distribution
    PENDING = 512  # gaps buffered before they are digested
    MAX_BOUNDS = 64

cdef double HUGE_GAP = 1e5
# Gaps from here up (27 hours; and NaN, inf) go to the distribution's own buffer instead: their sum in
# nanounits would risk overflowing the 64-bit integer this digest keeps it in.


cdef inline long long _ceil(double x) noexcept:
    """``ceil(x)`` as an integer (|x| < 2**62), without a call to libm's ``ceil``."""
    cdef long long k = <long long>x  # toward zero: the ceiling already for x <= 0
    return k + 1 if <double>k < x else k


@cython.final  # (its C methods are called directly, so they can be inlined)
cdef class Gaps:
    """A group's inter-chunk gaps, digested in C (what ``Distribution.flush`` does with numpy, value by value).

    Gaps are buffered PENDING at a time, then each is counted into its bucket and its sketch key in one
    tight loop (about 2 ns a gap less than one at a time, measured), with the distribution's own
    bounds and mapping (``ceil(log2(v) * multiplier) + offset``, with libm's ``log2``), and the totals
    are handed over with ``Distribution.add_digest`` every GAPS_BLOCK gaps and on :meth:`flush`: a
    4 KiB buffer, no numpy temporaries. (numpy may compute ``log2`` with its own vector code, SVML
    on AVX-512 machines, which can differ from libm in the last bit: a value within about 1e-16 of a
    bin edge could then land in the neighbouring bin, still within the sketch's relative accuracy.)
    """

    cdef public object dist
    cdef double bounds[MAX_BOUNDS]
    cdef Py_ssize_t nbounds
    cdef long long buckets[MAX_BOUNDS + 1]
    cdef double multiplier, min_possible
    cdef long long key_offset
    # Key counts, dense over [kbase, kbase + klen) (``counts`` points into ``key_array``'s data).
    cdef object key_array
    cdef long long *counts
    cdef long long kbase
    cdef Py_ssize_t klen
    cdef Py_ssize_t count, zeros, clamped
    cdef double low, high
    cdef long long sum_nano
    cdef double pending[PENDING]  # gaps not digested yet: digested PENDING at a time, in one tight loop
    cdef Py_ssize_t npending

    def __init__(self, dist):
        self.dist = dist
        bounds = dist.bounds
        if len(bounds) > MAX_BOUNDS:
            raise ValueError(f"at most {MAX_BOUNDS} bucket bounds, got {len(bounds)}")
        self.nbounds = len(bounds)
        for i, b in enumerate(bounds):
            self.bounds[i] = b
        mapping = dist.sketch._mapping
        self.multiplier = mapping._multiplier
        self.key_offset = int(mapping._offset)
        self.min_possible = mapping.min_possible
        self.key_array = None
        self.counts = NULL
        self.kbase = self.klen = 0
        self._reset()

    cdef void _reset(self) noexcept:
        cdef Py_ssize_t i
        for i in range(self.nbounds + 1):
            self.buckets[i] = 0
        self.count = self.zeros = self.clamped = 0
        self.sum_nano = 0
        self.low = INFINITY
        self.high = -INFINITY

    cdef int _grow(self, long long key) except -1:
        """Widen the dense key counts to cover *key* (with room around it)."""
        cdef long long lo = key - 512
        cdef long long hi = key + 512
        if self.klen:
            lo = min(lo, self.kbase)
            hi = max(hi, self.kbase + self.klen)
        grown = np.zeros(hi - lo, dtype=np.int64)
        if self.klen:
            grown[self.kbase - lo : self.kbase - lo + self.klen] = self.key_array
        cdef long long[::1] view = grown
        self.key_array = grown
        self.counts = &view[0]
        self.kbase = lo
        self.klen = hi - lo
        return 0

    cdef inline int add(self, double gap) except -1:
        if not gap < HUGE_GAP:  # also NaN and inf
            return self._to_dist(gap)
        self.pending[self.npending] = gap
        self.npending += 1
        if self.npending == PENDING:
            self._digest()
            if self.count >= GAPS_BLOCK:
                self.flush()
        return 0

    cdef int _digest(self) except -1:
        cdef Py_ssize_t i, j, n = self.npending
        cdef long long key
        cdef double gap
        self.npending = 0
        for j in range(n):
            gap = self.pending[j]
            if gap < 0.0:
                self.clamped += 1
                gap = 0.0
            if gap < self.low:
                self.low = gap
            if gap > self.high:
                self.high = gap
            self.sum_nano += llrint(gap * 1e9)  # = rint() as an integer: round half to even
            i = 0
            while i < self.nbounds and self.bounds[i] < gap:
                i += 1
            self.buckets[i] += 1
            if gap <= self.min_possible:
                self.zeros += 1
            else:
                key = _ceil(log2(gap) * self.multiplier) + self.key_offset
                if <unsigned long long>(key - self.kbase) >= <unsigned long long>self.klen:
                    self._grow(key)
                self.counts[key - self.kbase] += 1
        self.count += n
        return 0

    cdef int _to_dist(self, double gap) except -1:
        self.dist.add(gap)
        return 0

    def flush(self):
        """Hand the gaps so far to the distribution."""
        self._digest()
        if not self.count:
            return
        key_counts = None
        kmin = 0
        if self.count > self.zeros:
            used = np.flatnonzero(self.key_array)
            lo, hi = int(used[0]), int(used[-1]) + 1
            key_counts = self.key_array[lo:hi].copy()
            self.key_array[lo:hi] = 0
            kmin = self.kbase + lo
        self.dist.add_digest(
            count=self.count,
            clamped=self.clamped,
            low=self.low,
            high=self.high,
            sum_nano=self.sum_nano,
            buckets=[self.buckets[i] for i in range(self.nbounds + 1)],
            zeros=self.zeros,
            kmin=kmin,
            key_counts=key_counts,
        )
        self._reset()


cdef enum:
    FIRST_TEXTS = 16  # room for this many texts at first, then twice as much each time it is full


@cython.final  # (its C methods are called directly, so they can be inlined)
cdef class Live:
    """What the aggregator tracks of a stream between its start and its terminal event (see ``_hot.Live``)."""

    cdef public object start, agg, moderation, first, first_content, first_ts
    cdef public Gaps gaps
    cdef public Py_ssize_t empty, extra, first_n
    cdef public double gap_max
    cdef public bint done
    # The latest chunk's ts, as a C double (no float object to reach and count references on);
    # ``last`` below shows it to Python (None until the first chunk).
    cdef double last_ts
    cdef bint has_last
    # The texts (owned references) in a C array that doubles when full: one reference count and one store
    # per text (a list would fill its room with None first, and copy itself about 8 times as it grows).
    cdef PyObject **text_refs
    cdef Py_ssize_t ntexts, room, kept

    def __init__(self, start, agg):
        self.start = start
        self.agg = agg
        self.ntexts = 0
        self.gaps = agg.gaps
        self.moderation = {}
        self.empty = 0
        self.extra = 0
        self.first = None
        self.first_content = None
        self.first_ts = None
        self.first_n = 0
        self.has_last = False
        self.last_ts = 0.0
        self.gap_max = -INFINITY
        self.done = False

    def __dealloc__(self):
        self._release()

    cdef void _release(self) noexcept:
        cdef Py_ssize_t i
        cdef PyObject **refs = self.text_refs
        cdef Py_ssize_t kept = self.kept
        self.text_refs = NULL
        self.kept = self.room = 0
        for i in range(kept):
            Py_DECREF(<object>refs[i])
        PyMem_Free(refs)

    cdef inline int add_text(self, object text) except -1:
        cdef PyObject **grown
        cdef Py_ssize_t room
        if self.kept == self.room:
            room = 2 * self.room if self.room else FIRST_TEXTS
            grown = <PyObject **>PyMem_Realloc(self.text_refs, room * sizeof(PyObject *))
            if grown is NULL:
                raise MemoryError()
            self.text_refs = grown
            self.room = room
        Py_INCREF(text)
        self.text_refs[self.kept] = <PyObject *>text
        self.kept += 1
        self.ntexts += 1
        return 0

    @property
    def texts(self):
        """The text of every non-empty delta so far, in order (a new list)."""
        return [<object>self.text_refs[i] for i in range(self.kept)]

    def close(self):
        """The stream has finished (it left the live streams): mark it done and let its texts go."""
        self.done = True
        self._release()

    @property
    def last(self):
        """ts of the latest chunk (None before the first)."""
        return self.last_ts if self.has_last else None

    @last.setter
    def last(self, value):
        if value is None:
            self.has_last = False
        else:
            self.last_ts = value
            self.has_last = True

    @property
    def chunks(self):
        return self.ntexts + self.extra

    @property
    def ngaps(self):
        return self.chunks - self.first_n if self.first_ts is not None else 0

    def add_gap(self, double gap):
        self.gaps.add(gap)

    def add_gaps(self, double gap, Py_ssize_t n):
        cdef Py_ssize_t i
        for i in range(n):
            self.gaps.add(gap)

    @property
    def gap_sum(self):
        if self.first_ts is None or not self.has_last:
            return 0.0
        return self.last_ts - self.first_ts


# -- the id index: a stream id's Live without hashing the id ---------------------------------------
#
# Events decoded from the wire (Redis, a recording) carry a new str per event, so a dict lookup
# hashes every id afresh (siphash) before comparing it. The index sits in front of the live dict:
# 2-way sets keyed by a cheap hash of the id's characters, each entry holding its id (a str), its
# fingerprint (size, kind and first 8 bytes: the whole id when it is that short) and the Live the
# dict had for it. A hit is confirmed by comparing the characters and checking that the Live is
# not done (Live.close() is called whenever a stream leaves the dict), so the dict stays the truth:
# anything the index does not answer is looked up there, as before.

cdef enum:
    INDEX_SETS = 512  # a power of two; 2 entries each


cdef struct Entry:
    uint64_t hash  # 0: an empty entry
    uint64_t head  # the id's first 8 bytes (zero-padded)
    Py_ssize_t size  # the id's size in bytes, times 4, plus its kind (1, 2 or 4 bytes per character)
    PyObject *key  # owned: the id the entry was made for
    PyObject *live  # owned: the Live the dict had for it


cdef struct Id:
    const unsigned char *data
    uint64_t hash, head
    Py_ssize_t size, nbytes


cdef inline int _id(object sid, Id *out) except -1:
    """Read *sid* (an exact str): its bytes, hash and fingerprint."""
    cdef const unsigned char *p
    cdef Py_ssize_t nbytes, i
    cdef uint64_t h, w
    cdef int kind
    PyUnicode_READY(sid)
    kind = PyUnicode_KIND(sid)
    p = <const unsigned char *>PyUnicode_DATA(sid)
    nbytes = PyUnicode_GET_LENGTH(sid) * kind
    out.data = p
    out.nbytes = nbytes
    out.size = nbytes * 4 + kind
    h = <uint64_t>out.size * 0x9E3779B97F4A7C15ULL
    if nbytes >= 8:
        memcpy(&out.head, p, 8)
    while nbytes >= 8:
        memcpy(&w, p, 8)
        h = (h ^ w) * 0xFF51AFD7ED558CCDULL
        h ^= h >> 29
        p += 8
        nbytes -= 8
    w = 0
    for i in range(nbytes):
        w |= (<uint64_t>p[i]) << (8 * i)
    if out.nbytes < 8:
        out.head = w
    h = (h ^ w) * 0xC4CEB9FE1A85EC53ULL
    h ^= h >> 32
    out.hash = h | 1  # never 0: 0 marks an empty entry
    return 0


cdef inline bint _is(Entry *entry, Id *sid) noexcept:
    """Whether *entry* was made for the id *sid* (equal characters)."""
    if entry.hash != sid.hash or entry.head != sid.head or entry.size != sid.size:
        return False
    return sid.nbytes <= 8 or memcmp(PyUnicode_DATA(<object>entry.key), sid.data, sid.nbytes) == 0


cdef inline PyObject *_find(Feeder self, object sid) except? NULL:
    """sid's Live (borrowed), or NULL when it has none: through the index for an exact str id."""
    cdef Id key
    cdef Entry *entry
    cdef Entry moved
    if not PyUnicode_CheckExact(sid):
        return PyDict_GetItemWithError(self.live, sid)
    _id(sid, &key)
    entry = &self.entries[2 * (key.hash & (INDEX_SETS - 1))]
    if _is(&entry[0], &key) and not (<Live><object>entry[0].live).done:
        return entry[0].live
    if _is(&entry[1], &key) and not (<Live><object>entry[1].live).done:
        moved = entry[1]  # most recently used first
        entry[1] = entry[0]
        entry[0] = moved
        return entry[0].live
    return self.miss(sid, &key, entry)


@cython.final  # (its C methods are called directly, so they can be inlined)
cdef class Feeder:
    """Feeds batches of events to one aggregator's live streams (``_hot.Feeder``, compiled, with an id index)."""

    cdef readonly dict live
    cdef Entry entries[2 * INDEX_SETS]

    def __cinit__(self, dict live not None):
        self.live = live
        memset(self.entries, 0, sizeof(self.entries))

    def __dealloc__(self):
        cdef Py_ssize_t i
        for i in range(2 * INDEX_SETS):
            Py_XDECREF(self.entries[i].key)
            Py_XDECREF(self.entries[i].live)

    cdef PyObject *miss(self, object sid, Id *key, Entry *entry) except? NULL:
        """Look *sid* up in the live dict; remember its Live in *entry*'s set."""
        cdef Entry moved
        cdef PyObject *found = PyDict_GetItemWithError(self.live, sid)
        if found is NULL or type(<object>found) is not Live:
            return found
        if _is(&entry[0], key):
            pass  # this id's stale entry, in front: renew it
        elif _is(&entry[1], key):
            moved = entry[1]  # this id's stale entry: renew it, in front
            entry[1] = entry[0]
            entry[0] = moved
        else:  # the set's least recently used entry makes room
            Py_XDECREF(entry[1].key)
            Py_XDECREF(entry[1].live)
            entry[1] = entry[0]
            Py_INCREF(sid)
            entry[0].key = <PyObject *>sid
            entry[0].live = NULL
            entry[0].hash = key.hash
            entry[0].head = key.head
            entry[0].size = key.size
        Py_INCREF(<object>found)
        Py_XDECREF(entry[0].live)
        entry[0].live = found
        return found

    def feed(self, events, other):
        """Account for *events*; hand every non-delta event to *other*; return the orphan deltas."""
        cdef Py_ssize_t orphans = 0
        cdef PyObject *found
        cdef PyObject *stream
        cdef PyObject *text
        cdef PyObject *ts
        cdef Live st
        cdef double gap, now
        if type(events) is not list and type(events) is not tuple:
            events = list(events)
        cdef Py_ssize_t i = 0
        cdef PyObject *ahead
        while i < PySequence_Fast_GET_SIZE(events):  # (read again: `other` runs Python code)
            # Ask the memory for a later delta's id and time now: those objects are cold (nothing else
            # reads them), and by the time the loop gets there they have arrived.
            if i + PREFETCH < PySequence_Fast_GET_SIZE(events):
                ahead = PySequence_Fast_GET_ITEM(events, i + PREFETCH)
                if <PyTypeObject *>Py_TYPE(<object>ahead) is DELTA:
                    SB_PREFETCH(_slot(<object>ahead, STREAM))
                    SB_PREFETCH(_slot(<object>ahead, TS))
            event = <object>PySequence_Fast_GET_ITEM(events, i)
            i += 1
            if <PyTypeObject *>Py_TYPE(event) is not DELTA:
                other(event)
                continue
            stream = _slot(event, STREAM)
            text = _slot(event, TEXT)
            ts = _slot(event, TS)
            if stream is NULL or text is NULL or ts is NULL or _slot(event, N) is NULL:
                raise AttributeError("DeltaEvent with an unset field")
            found = _find(self, <object>stream)
            if found is NULL:
                orphans += 1
                continue
            st = <Live?>found
            if (PyUnicode_GET_LENGTH(<object>text) == 0) if PyUnicode_CheckExact(<object>text) else not <object>text:
                st.empty += 1
                continue
            st.add_text(<object>text)
            if (
                not st.has_last
                or st.first_content is None
                or _slot(event, N) is not <PyObject *>ONE
                or not PyFloat_CheckExact(<object>ts)
            ):
                slow_delta(st, event)
                continue
            now = PyFloat_AS_DOUBLE(<object>ts)
            gap = now - st.last_ts
            st.last_ts = now
            st.gaps.add(gap)
            if gap > st.gap_max:
                st.gap_max = gap
        return orphans
