"""Fixes for two consumer bugs in kafka-python 3.0.12 (the latest release), applied on import.

1. The group join.

``KafkaConsumer.poll`` runs the group's JoinGroup/SyncGroup as a background task and awaits
it only as long as the poll's own timeout. When the task finishes while no poll awaits it
(the gap between polls; long on a starved CPU), kafka-python drops the result:

- if a rejoin is still flagged, the next poll starts a new JoinGroup instead (for a group
  leader: one more rebalance of the whole group);
- if the rejoin came from a metadata change the leader saw (partitions added, or a member
  subscribed to a topic the leader had no metadata for), the dropped join has already updated
  the leader's snapshot, nothing is flagged any more, and the member never applies its
  assignment nor heartbeats again: it sits idle, cannot commit, and is evicted.

The Java client keeps a finished join until a poll applies it (``rejoinNeededOrPending``);
this does the same. Only 3.0.12 is patched: the test that reproduces the bug step by step
(``tests/integration/test_bus.py``) says whether a later release still needs it.

2. A paused partition's parked records (KAFKA-7548). Records fetched for a partition that is
then paused are parked, and the partition is not fetched again while they are parked; on
``resume`` they are restored only when the in-line slot (``_next_partition_records``) is
``None``. But a consumed slot is left holding its drained, falsy ``PartitionRecords``, not
``None``, so once another partition's records went through, the parked ones are never
restored and the resumed partition is never fetched again: it stalls for good, with lag and
nothing in flight. The processor pauses partitions at the round protocol's fence (and when
its window is full), so a sampler's partition stopped for good mid-round (found by the fault
matrix, ``benchmarks/bench_faults.py``). The fix empties a drained slot first, as the loop
below it already treats a falsy slot as empty; ``tests/integration/test_bus.py`` reproduces
the stall.
"""

from __future__ import annotations

import kafka
from kafka.consumer.fetcher import Fetcher
from kafka.coordinator.base import BaseCoordinator
from kafka.structs import MemberState

PATCHED_VERSIONS = ("3.0.12",)


def _need_rejoin(self: BaseCoordinator) -> bool:
    # A join in flight, or finished but not applied yet, still needs a poll to complete it.
    return self.rejoin_needed or self._join_task is not None


_original_join_group_async = BaseCoordinator.join_group_async


async def _join_group_async(self: BaseCoordinator, timeout_ms: float | None = None) -> bool:
    task = self._join_task
    if task is not None and task.is_done:
        # What kafka-python does with a join it awaited to the end, done for one that ended
        # between polls, instead of replacing it with a new JoinGroup.
        self._join_task = None
        if task.exception is None:
            with self._lock:
                self.rejoining = False
                self.rejoin_needed = False
                self.state = MemberState.STABLE
                self._enable_heartbeat()
            generation = self._generation
            await self._on_join_complete_async(
                generation.generation_id, generation.member_id, generation.protocol, task.value
            )
            return True
        # A failed attempt: its response handler has already reset what the error calls for;
        # try again (a non-retriable error comes back from the new attempt and is raised).
        self.request_rejoin()
    return await _original_join_group_async(self, timeout_ms)


_original_fetched_records = Fetcher.fetched_records


def _fetched_records(self: Fetcher, max_records=None, update_offsets=True):
    slot = self._next_partition_records
    if slot is not None and not slot:  # drained: free the slot for a resumed partition
        self._next_partition_records = None
    return _original_fetched_records(self, max_records, update_offsets)


def apply() -> None:
    if kafka.__version__ not in PATCHED_VERSIONS:
        return
    if getattr(BaseCoordinator, "_onpolicy_patched", False):
        return
    BaseCoordinator.need_rejoin = _need_rejoin
    BaseCoordinator.join_group_async = _join_group_async
    BaseCoordinator._onpolicy_patched = True
    Fetcher.fetched_records = _fetched_records


apply()
