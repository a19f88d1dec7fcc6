"""The test payload format: pure, no sockets."""

import hashlib
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mcrelay.cli.traffic import payload

seqs = st.integers(0, 2**64 - 1)
streams = st.integers(0, 2**32 - 1)
stamps = st.integers(0, 2**64 - 1)
sizes = st.one_of(
    st.integers(payload.HEADER_SIZE, 2048),
    st.sampled_from([payload.HEADER_SIZE, payload.MAX_SIZE]),
)


def test_layout_is_stable():
    # gen and sink of different versions must agree: any change here is a wire format change.
    assert payload.HEADER_SIZE == 24
    assert payload.expected_payload(7, 40, 3, 1).hex() == (
        "4d43524c0000000300000000000000070000000000000001fd17cbec94ff2bca6155cec49deb4485"
    )
    digest = hashlib.sha256(payload.expected_payload(7, 100, 3, 123456789)).hexdigest()
    assert digest == "e9786d3e13aff07ff95257fb5d4103dc6618a8c8dd5a159ce66a465cd7d76469"


@given(seq=seqs, size=sizes, stream=streams, ts=stamps)
def test_round_trip(seq, size, stream, ts):
    data = payload.build_payload(seq, size, stream, ts_ns=ts)
    assert len(data) == size
    assert data == payload.expected_payload(seq, size, stream, ts)
    assert payload.parse_header(data) == (stream, seq, ts)
    assert payload.filler_ok(data, seq, stream)


@given(seq=seqs, size=sizes, stream=streams, ts=stamps, at=st.integers(0))
def test_write_payload_matches_expected(seq, size, stream, ts, at):
    at %= 64
    buf = bytearray(at + size + 8)
    payload.write_payload(buf, at, seq, size, stream, ts)
    assert bytes(buf[at : at + size]) == payload.expected_payload(seq, size, stream, ts)
    assert buf[:at] == bytes(at)
    assert buf[at + size :] == bytes(8)


@given(seq=seqs, size=st.integers(payload.HEADER_SIZE + 1, 2048), stream=streams, data=st.data())
def test_any_changed_filler_byte_is_detected(seq, size, stream, data):
    good = payload.expected_payload(seq, size, stream)
    at = data.draw(st.integers(payload.HEADER_SIZE, size - 1))
    flip = data.draw(st.integers(1, 255))
    bad = bytearray(good)
    bad[at] ^= flip
    assert not payload.filler_ok(bad, seq, stream)


@given(seq=seqs, stream=streams)
def test_a_payload_does_not_pass_for_its_neighbour(seq, stream):
    data = payload.expected_payload(seq, 1024, stream)
    assert not payload.filler_ok(data, (seq + 1) % 2**64, stream)
    assert not payload.filler_ok(data, seq, (stream + 1) % 2**32)


def test_build_payload_stamps_realtime():
    before = time.clock_gettime_ns(time.CLOCK_REALTIME)
    header = payload.parse_header(payload.build_payload(1, 64))
    after = time.clock_gettime_ns(time.CLOCK_REALTIME)
    assert header is not None
    assert before <= header[2] <= after


@pytest.mark.parametrize(
    "data",
    [b"", b"MCRL", b"MCRL" + bytes(19), b"XCRL" + bytes(20), bytes(1024)],
)
def test_parse_header_rejects_foreign_data(data):
    assert payload.parse_header(data) is None


@pytest.mark.parametrize("size", [-1, 0, payload.HEADER_SIZE - 1, payload.MAX_SIZE + 1])
def test_size_bounds(size):
    with pytest.raises(ValueError, match="payload size"):
        payload.check_size(size)
    with pytest.raises(ValueError, match="payload size"):
        payload.expected_payload(0, size)


def test_header_only_payload():
    data = payload.expected_payload(5, payload.HEADER_SIZE, 2, 9)
    assert payload.parse_header(data) == (2, 5, 9)
    assert payload.filler_ok(data, 5, 2)
