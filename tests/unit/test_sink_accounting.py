"""The sink's accounting (loss, duplicates, order, integrity, latency) on synthetic batches."""

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from mcrelay.cli.traffic import payload, sink

SLOT = 2048
T0 = 1_700_000_000_000_000_000


def feed(tally: sink._Tally, packets: list[bytes], rx: list[int] | None = None) -> None:
    data = bytearray(SLOT * len(packets))
    for i, p in enumerate(packets):
        data[i * SLOT : i * SLOT + len(p)] = p
    times = rx if rx is not None else [T0] * len(packets)
    tally.add_batch(memoryview(data), SLOT, [len(p) for p in packets], times)


def pkt(seq: int, stream: int = 0, size: int = 100, ts: int = T0) -> bytes:
    return payload.expected_payload(seq, size, stream, ts)


def report(tally: sink._Tally, count: int | None = None) -> dict[int, sink.StreamReport]:
    return {sid: s.report(count, len(tally.streams) == 1) for sid, s in tally.streams.items()}


def test_loss_duplicates_and_reordering():
    tally = sink._Tally(None)
    feed(tally, [pkt(s) for s in (0, 1, 3, 2, 2, 6, 5, 9)])
    r = report(tally)[0]
    assert (r.min_seq, r.max_seq, r.expected, r.unique) == (0, 9, 10, 7)
    assert (r.lost, r.duplicated, r.reordered, r.received) == (3, 1, 2, 8)


def test_tail_loss_shows_when_count_is_known():
    tally = sink._Tally(None)
    feed(tally, [pkt(s) for s in range(90)])
    assert report(tally)[0].lost == 0
    assert report(tally, count=100)[0].lost == 10


def test_streams_are_counted_apart():
    tally = sink._Tally(None)
    feed(tally, [pkt(0, 1), pkt(0, 2), pkt(2, 1), pkt(1, 2), pkt(1, 1)])
    r = report(tally)
    assert (r[1].unique, r[1].lost, r[1].reordered) == (3, 0, 1)
    assert (r[2].unique, r[2].lost, r[2].reordered) == (2, 0, 0)


def test_corrupted_and_foreign_datagrams():
    tally = sink._Tally(None)
    flipped = bytearray(pkt(1))
    flipped[50] ^= 0xFF
    feed(tally, [pkt(0), bytes(flipped), b"hello", b"XXXX" + bytes(40), pkt(2)])
    assert (tally.received, tally.corrupted, tally.malformed) == (5, 1, 2)
    r = report(tally)[0]
    assert (r.unique, r.lost) == (2, 1)  # a corrupted datagram was not delivered intact


def test_expected_size_catches_truncation():
    tally = sink._Tally(100)
    feed(tally, [pkt(0), pkt(1, size=60)])
    assert tally.corrupted == 1


def test_latency_percentiles_in_microseconds():
    tally = sink._Tally(None)
    lat_us = list(range(1, 101))
    feed(tally, [pkt(i) for i in range(100)], [T0 + us * 1000 for us in lat_us])
    lat = tally.latency
    assert (lat.percentile(0.5), lat.percentile(0.9), lat.percentile(0.99), lat.max) == (
        50,
        90,
        99,
        100,
    )


def test_max_gap_spans_batches_and_any_stream():
    tally = sink._Tally(None)
    feed(tally, [pkt(0)], [T0])
    assert tally.gaps.max_us is None  # one datagram: no interval yet
    feed(tally, [pkt(1), pkt(0, 1), b"junk"], [T0 + 1_000, T0 + 4_000, T0 + 5_000])
    assert tally.gaps.max_ns == 3_000
    feed(tally, [pkt(2)], [T0 + 12_000])  # the gap between two batches counts too
    assert tally.gaps.max_ns == 7_000
    feed(tally, [pkt(3), pkt(4)], [T0 + 11_000, T0 + 11_500])  # a clock step back: no gap
    assert (tally.gaps.max_ns, tally.gaps.max_us, tally.gaps.found) == (7_000, 7, [])


def test_long_silences_are_listed_with_the_datagrams_around_them():
    ms = 1_000_000
    tally = sink._Tally(None)
    feed(tally, [pkt(0), pkt(1)], [T0, T0 + ms])
    feed(tally, [pkt(40), pkt(41), pkt(90)], [T0 + 40 * ms, T0 + 41 * ms, T0 + 60 * ms])
    feed(tally, [b"junk", pkt(0, 1)], [T0 + 75 * ms, T0 + 76 * ms])
    gaps = [(g.start_ns - T0, g.gap_us, g.before, g.after, g.missing) for g in tally.gaps.found]
    assert gaps == [
        (ms, 39_000, (0, 1), (0, 40), 38),  # across two batches
        (41 * ms, 19_000, (0, 41), (0, 90), 48),
        (60 * ms, 15_000, (0, 90), None, None),  # no header after it: nothing to count
    ]
    assert tally.gaps.max_us == 39_000


def test_only_the_longest_silences_are_kept():
    tally = sink._Tally(None)
    times = [T0 + sum(range(10_000_000, 10_000_000 + i * 1000, 1000)) for i in range(100)]
    feed(tally, [pkt(i) for i in range(100)], times)
    kept = tally.gaps.found
    assert len(kept) == sink.MAX_GAPS
    assert min(g.gap_us for g in kept) == 10_000 + (100 - sink.MAX_GAPS - 1)
    assert kept == sorted(kept, key=lambda g: g.start_ns)


def test_max_gap_shows_in_the_summary():
    fields = dict.fromkeys(sink.SinkReport.__struct_fields__, 0)
    fields.update(group="239.1.1.1", interface=None, stopped_by="count", latency_clock="kernel")
    fields.update(latency_max_us=None, streams={}, max_gap_us=2_345, gaps=[])
    report = msgspec.convert(fields, sink.SinkReport)
    assert "max gap     2345 µs" in report.summary()
    assert '"max_gap_us":2345,"gaps":[]' in report.to_json()
    no_gap = msgspec.structs.replace(report, max_gap_us=None).summary()
    assert "max gap     - " in no_gap


def test_large_latencies_are_bucketed_within_one_percent():
    tally = sink._Tally(None)
    feed(tally, [pkt(0)], [T0 + 123_456_789])
    assert tally.latency.max == 123_456
    assert abs(tally.latency.percentile(0.5) - 123_456) / 123_456 < 0.008


def test_window_grows_slides_and_forgets():
    s = sink._Stream(10_000)
    for seq in (10_000, 3, 10_000 + 500_000, 3, 1 << 26):
        s.add(seq)
    assert (s.unique, s.dup, s.min_seq, s.max_seq) == (4, 1, 3, 1 << 26)
    s.add(5)  # older than the window: still counted, duplicates no longer detectable
    s.add(5)
    assert (s.unique, s.dup) == (6, 1)
    assert len(s.bits) <= sink._WINDOW // 8


@given(st.lists(st.integers(0, 300_000), min_size=1, max_size=200))
def test_bitmap_agrees_with_a_set(seqs):
    s = sink._Stream(seqs[0])
    for seq in seqs:
        s.add(seq)
    assert s.unique == len(set(seqs))
    assert s.dup == len(seqs) - len(set(seqs))
    assert (s.min_seq, s.max_seq) == (min(seqs), max(seqs))


@given(st.lists(st.integers(0, 20_000), min_size=1, max_size=300))
def test_tally_agrees_with_a_model(seqs):
    tally = sink._Tally(None)
    feed(tally, [pkt(seq, size=payload.HEADER_SIZE) for seq in seqs])
    seen: set[int] = set()
    top, reordered = -1, 0
    for seq in seqs:
        if seq not in seen:
            reordered += seq < top
            seen.add(seq)
            top = max(top, seq)
    r = report(tally)[0]
    assert (r.unique, r.duplicated, r.reordered) == (len(seen), len(seqs) - len(seen), reordered)
    assert r.lost == max(seqs) - min(seqs) + 1 - len(seen)
