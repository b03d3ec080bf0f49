# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""The aggregator's per-event hot path, compiled: a mirror of ``_hot.py`` (the behaviour reference).

Only :func:`feed`'s fast path is here (a one-chunk delta of a stream that
already has its first content); every other delta goes to the same
:func:`streambus_stats._hot.slow_delta` the pure-Python path uses. Change
``_hot.py`` and this file together; the tests compare them figure by figure.

What makes it fast: a delta's fields are read straight from the event's
slots, at the offsets its class's member descriptors give (looked up once, at
import, and checked: if ``DeltaEvent`` is ever not laid out as slots this
module refuses to import and the pure-Python path is used).
"""

from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_CheckExact
from cpython.object cimport PyObject, PyTypeObject
from cpython.ref cimport Py_TYPE

import math
import types
from collections import Counter

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


cdef inline PyObject *_slot(object obj, Py_ssize_t offset):
    return (<PyObject **>((<char *><PyObject *>obj) + offset))[0]


cdef enum:
    GAPS_BLOCK = 16384


cdef class Gaps:
    """A group's inter-chunk gaps on their way to its distribution, in a float64 array handed over when full."""

    cdef public object dist
    cdef object array
    cdef double[::1] data
    cdef Py_ssize_t fill

    def __init__(self, dist):
        self.dist = dist
        self._new()

    cdef _new(self):
        self.array = np.empty(GAPS_BLOCK, dtype=np.float64)
        self.data = self.array
        self.fill = 0

    cdef inline int add(self, double gap) except -1:
        self.data[self.fill] = gap
        self.fill += 1
        if self.fill == GAPS_BLOCK:
            self.flush()
        return 0

    def flush(self):
        """Hand the gaps collected so far to the distribution."""
        if self.fill:
            self.dist.add_array(self.array[: self.fill])
            self._new()


cdef class Live:
    """What the aggregator tracks of a stream between its start and its terminal event (see ``_hot.Live``)."""

    cdef public object start, agg, moderation, first, first_content, first_ts
    cdef public list texts
    cdef public Gaps gaps
    cdef public Py_ssize_t empty, extra, first_n
    cdef public double gap_max
    # The latest chunk's ts, as a C double (no float object to reach and count references on);
    # ``last`` below shows it to Python (None until the first chunk).
    cdef double last_ts
    cdef bint has_last

    def __init__(self, start, agg):
        self.start = start
        self.agg = agg
        self.texts = []
        self.gaps = agg.gaps
        self.moderation = Counter()
        self.empty = 0
        self.extra = 0
        self.first = None
        self.first_content = None
        self.first_ts = None
        self.first_n = 0
        self.has_last = False
        self.last_ts = 0.0
        self.gap_max = -math.inf

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
        return len(self.texts) + self.extra

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


def feed(dict live, events, other):
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
    for event in events:
        if <PyTypeObject *>Py_TYPE(event) is not DELTA:
            other(event)
            continue
        stream = _slot(event, STREAM)
        text = _slot(event, TEXT)
        ts = _slot(event, TS)
        if stream is NULL or text is NULL or ts is NULL or _slot(event, N) is NULL:
            raise AttributeError("DeltaEvent with an unset field")
        found = PyDict_GetItemWithError(live, <object>stream)
        if found is NULL:
            orphans += 1
            continue
        st = <Live?>found
        if (PyUnicode_GET_LENGTH(<object>text) == 0) if PyUnicode_CheckExact(<object>text) else not <object>text:
            st.empty += 1
            continue
        st.texts.append(<object>text)
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
