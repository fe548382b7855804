"""Which queued crops go into the next model call.

A worker serves every decoder that talks to it, and one model call takes crops of several
jobs (DeepStream batches many streams into one call the same way). So that no job starves
behind a long one and live frames make their deadlines:

1. crops with a deadline (live jobs) first, the earliest deadline first;
2. then the others round robin over their decoders: one crop from each decoder in turn,
   starting with the decoder whose oldest crop has waited longest.

Each decoder's crops keep their arrival order, so a track's crops reach its temporal state
in frame order.
"""

from __future__ import annotations

from collections import deque


def take_batch(queue: deque, size: int) -> list:
    """Remove and return up to ``size`` items of ``queue`` (each with ``.peer`` and
    ``.deadline``, None or the worker's ``time.monotonic()``), chosen as the module docstring
    says."""
    chosen = sorted((p for p in queue if p.deadline is not None), key=lambda p: p.deadline)[:size]
    if len(chosen) < size:
        by_peer: dict[bytes, deque] = {}  # insertion order: peers by their oldest crop
        for p in queue:
            if p.deadline is None:
                by_peer.setdefault(p.peer, deque()).append(p)
        turn = deque(by_peer)
        while len(chosen) < size and turn:
            peer = turn.popleft()
            chosen.append(by_peer[peer].popleft())
            if by_peer[peer]:
                turn.append(peer)
    taken = {id(p) for p in chosen}
    kept = [p for p in queue if id(p) not in taken]
    queue.clear()
    queue.extend(kept)
    return chosen
