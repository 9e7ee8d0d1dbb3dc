from kafka.structs import TopicPartition

from onpolicy.bus.processor import _Offsets

TP = TopicPartition("t", 0)


def test_commit_position_waits_for_the_lowest_unfinished_record():
    o = _Offsets()
    for off in (10, 11, 12):
        o.start(TP, off)
    o.done(TP, 11)
    o.done(TP, 12)
    assert o.to_commit() == {TP: 10}  # 10 is still in flight
    o.done(TP, 10)
    assert o.to_commit() == {TP: 13}
    o.committed[TP] = 13
    assert o.to_commit() == {}


def test_forget_drops_revoked_partitions():
    o = _Offsets()
    o.start(TP, 1)
    o.forget([TP])
    assert o.in_flight() == 0 and o.to_commit() == {}
