"""How a worker picks the crops of its next model call: deadlines first, then fair shares."""

from collections import deque
from dataclasses import dataclass


from workers.batching import take_batch


@dataclass
class _Item:
    peer: bytes
    frame: int
    deadline: float | None


def _queue(*spec):
    return deque(_Item(peer, frame, deadline) for peer, frame, deadline in spec)


def test_a_job_with_a_long_queue_does_not_starve_the_others():
    long = [(b"long", f, None) for f in range(20)]
    queue = _queue(*long[:10], (b"short", 0, None), *long[10:], (b"short", 1, None))
    first = take_batch(queue, 4)
    assert [(i.peer, i.frame) for i in first] == [(b"long", 0), (b"short", 0), (b"long", 1), (b"short", 1)]
    assert len(queue) == 18 and all(i.peer == b"long" for i in queue)


def test_crops_with_a_deadline_go_first_earliest_first():
    queue = _queue((b"file", 0, None), (b"live", 0, 10.5), (b"file", 1, None), (b"cam", 0, 10.2), (b"live", 1, 10.6))
    assert [(i.peer, i.frame) for i in take_batch(queue, 3)] == [(b"cam", 0), (b"live", 0), (b"live", 1)]
    assert [(i.peer, i.frame) for i in queue] == [(b"file", 0), (b"file", 1)]


def test_each_decoders_crops_keep_their_order():
    queue = _queue(*[(peer, f, None) for f in range(6) for peer in (b"a", b"b", b"c")])
    taken = []
    while queue:
        taken += take_batch(queue, 4)
    for peer in (b"a", b"b", b"c"):
        assert [i.frame for i in taken if i.peer == peer] == list(range(6))
