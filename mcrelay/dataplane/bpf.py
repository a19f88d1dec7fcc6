"""Classic BPF filters for the capture sockets: frames nobody asked for stay in the kernel.

An AF_PACKET socket bound to ETH_P_ALL sees every frame on its interface, including unicast
traffic and the relay's own output. The filter lets through what userspace must see: frames for
a configured (group, port), plus the frames to configured groups that userspace has to count as
drops (fragments, other protocols, truncated headers), plus whatever the filter cannot judge
(inline VLAN tags, frames too short to read). It keeps out every frame with more than one VLAN
tag, and tagged frames of VLANs no rule names, so no stacked-tag flood reaches userspace.
Userspace still matches every frame exactly, so a filter that lets through too much costs CPU,
never correctness.

Programs expect SOCK_RAW offsets (the Ethernet header at 0). Attach the filter before binding the
socket to a protocol (or before PACKET_RX_RING, which purges the queue), or frames queued in
between escape it. Fanout members each run their own filter: give them all the same one.
"""

from __future__ import annotations

import ctypes
import dataclasses
import ipaddress
import socket
import struct
from collections.abc import Callable, Iterable

from mcrelay.system.linux import PACKET_OUTGOING, SO_ATTACH_FILTER

Instruction = tuple[int, int, int, int]  # code, jt, jf, k, as in struct sock_filter

# linux/filter.h (classic BPF)
BPF_LD, BPF_LDX, BPF_ST, BPF_STX, BPF_ALU, BPF_JMP, BPF_RET, BPF_MISC = range(8)
BPF_W, BPF_H, BPF_B = 0x00, 0x08, 0x10
BPF_IMM, BPF_ABS, BPF_IND, BPF_MEM, BPF_LEN, BPF_MSH = 0x00, 0x20, 0x40, 0x60, 0x80, 0xA0
BPF_ADD, BPF_SUB, BPF_MUL, BPF_DIV, BPF_OR, BPF_AND, BPF_LSH, BPF_RSH, BPF_NEG = (
    0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80,
)  # fmt: skip
BPF_JA, BPF_JEQ, BPF_JGT, BPF_JGE, BPF_JSET = 0x00, 0x10, 0x20, 0x30, 0x40
BPF_K, BPF_X, BPF_A = 0x00, 0x08, 0x10
BPF_TAX, BPF_TXA = 0x00, 0x80
BPF_MAXINSNS = 4096
SKF_AD_OFF = -0x1000
SKF_AD_PKTTYPE = 4
SKF_AD_VLAN_TAG = 44  # the TCI of the outer tag the kernel moved out of the frame
SKF_AD_VLAN_TAG_PRESENT = 48  # linux/filter.h: offsets are multiples of 4
VLAN_VID_MASK = 0x0FFF

ACCEPT = 0x40000  # bytes to keep: the whole frame
DROP = 0
LEAF = 8  # a search tree scans at most this many values linearly

_NO_PORT = 0x10000  # X for frames without a readable port: matches no port, fails the tree
_MAX_JUMP = 255  # jt/jf are 8 bits; `ja` is 32
_NEAR_PORTS = 128  # a port list this short keeps its exits within _MAX_JUMP


@dataclasses.dataclass(slots=True)
class _Op:
    """One instruction; jumps name labels (None: the next instruction) until assembly."""

    code: int
    k: int = 0
    jt: str | None = None  # for `ja`, the target
    jf: str | None = None

    @property
    def is_cond(self) -> bool:
        return self.code & 0x07 == BPF_JMP and self.code & 0xF0 != BPF_JA

    @property
    def is_terminal(self) -> bool:
        """Never falls through, so a copy of it can stand in for a jump to it."""
        return self.code & 0x07 == BPF_RET or self.code == BPF_JMP | BPF_JA


class _Asm:
    """Emit instructions with symbolic forward jumps; `assemble` resolves them."""

    def __init__(self) -> None:
        self.items: list[_Op | str] = []  # a str marks where a label points
        self._labels = 0

    def label(self) -> str:
        self._labels += 1
        return f"L{self._labels}"

    def place(self, label: str) -> None:
        self.items.append(label)

    def op(self, code: int, k: int = 0) -> None:
        self.items.append(_Op(code, k & 0xFFFFFFFF))

    def jump(self, code: int, k: int, jt: str | None, jf: str | None) -> None:
        self.items.append(_Op(BPF_JMP | code | BPF_K, k, jt, jf))

    def ja(self, target: str) -> None:
        self.items.append(_Op(BPF_JMP | BPF_JA, 0, target))

    def ret(self, k: int) -> None:
        self.items.append(_Op(BPF_RET | BPF_K, k))

    def assemble(self) -> list[Instruction]:
        """Resolve labels; a conditional jump too far for 8 bits gets a trampoline after it.

        The trampoline is a copy of the target when that is a `ret` or `ja`, else a `ja` to it.
        Inserting trampolines only lengthens other jumps, so repeating until none is too far
        terminates.
        """
        items = self.items
        while True:
            pos, at = _layout(items)
            out: list[_Op | str] = []
            index = -1
            for item in items:
                out.append(item)
                if isinstance(item, str):
                    continue
                index += 1
                if not item.is_cond:
                    continue
                jt_far, jf_far = (
                    t is not None and pos[t] - index - 1 > _MAX_JUMP for t in (item.jt, item.jf)
                )
                if not (jt_far or jf_far):
                    continue
                after = self.label()  # the old next instruction, now behind the trampolines
                jt, jf = item.jt or after, item.jf or after
                out[-1] = new = _Op(item.code, item.k)
                new.jt = self._trampoline(out, at[jt], jt) if jt_far else jt
                new.jf = self._trampoline(out, at[jf], jf) if jf_far else jf
                out.append(after)
            if len(out) == len(items):
                break
            items = out
        self.items = items
        return _encode(items)

    def _trampoline(self, out: list[_Op | str], target: _Op, label: str) -> str:
        """Append a stand-in for a jump to `label` (pointing at `target`); return its label."""
        here = self.label()
        out.append(here)
        if target.is_terminal:
            out.append(_Op(target.code, target.k, target.jt))
        else:
            out.append(_Op(BPF_JMP | BPF_JA, 0, label))
        return here


def _layout(items: list[_Op | str]) -> tuple[dict[str, int], dict[str, _Op]]:
    """Label → instruction index, and label → the instruction it points at."""
    pos: dict[str, int] = {}
    at: dict[str, _Op] = {}
    pending: list[str] = []
    index = 0
    for item in items:
        if isinstance(item, str):
            pos[item] = index
            pending.append(item)
        else:
            for label in pending:
                at[label] = item
            pending.clear()
            index += 1
    if pending:
        raise AssertionError(f"labels {pending} point past the program")
    return pos, at


def _encode(items: list[_Op | str]) -> list[Instruction]:
    pos, _ = _layout(items)
    program: list[Instruction] = []

    def offset(label: str | None, index: int) -> int:
        distance = 0 if label is None else pos[label] - index - 1
        if distance < 0:
            raise AssertionError("classic BPF jumps forward only")
        return distance

    for item in items:
        if isinstance(item, str):
            continue
        index = len(program)
        if item.is_cond:
            program.append((item.code, offset(item.jt, index), offset(item.jf, index), item.k))
        elif item.code == BPF_JMP | BPF_JA:
            program.append((item.code, 0, 0, offset(item.jt, index)))
        else:
            program.append((item.code, 0, 0, item.k))
    return program


# ---- code generation -------------------------------------------------------------------------


def _split(values: list[int], leaf: int) -> Iterable[list[int]]:
    """The leaves `_tree` produces for these values, in order."""
    if len(values) <= leaf:
        yield values
        return
    mid = len(values) // 2
    yield from _split(values[:mid], leaf)
    yield from _split(values[mid:], leaf)


def _tree(asm: _Asm, values: list[int], leaf: int, emit_leaf: Callable[[list[int]], None]) -> None:
    """Binary search on A over sorted `values`; `emit_leaf` handles each small run linearly."""
    if len(values) <= leaf:
        emit_leaf(values)
        return
    mid = len(values) // 2
    right = asm.label()
    asm.jump(BPF_JGE, values[mid], right, None)
    _tree(asm, values[:mid], leaf, emit_leaf)
    asm.place(right)
    _tree(asm, values[mid:], leaf, emit_leaf)


def _member(asm: _Asm, values: list[int], leaf: int, yes: str, no: str) -> None:
    """Jump to `yes` if A is in `values`, else to `no`."""

    def emit_leaf(run: list[int]) -> None:
        for value in run[:-1]:
            asm.jump(BPF_JEQ, value, yes, None)
        asm.jump(BPF_JEQ, run[-1], yes, no)

    _tree(asm, values, leaf, emit_leaf)


def _member_local(asm: _Asm, values: list[int], leaf: int, yes: _Op, no: _Op) -> None:
    """`_member` whose leaves end in their own copies of the terminal `yes` and `no`."""

    def emit_leaf(run: list[int]) -> None:
        y, n = asm.label(), asm.label()
        for value in run[:-1]:
            asm.jump(BPF_JEQ, value, y, None)
        asm.jump(BPF_JEQ, run[-1], y, n)
        for label, op in ((y, yes), (n, no)):
            asm.place(label)
            asm.items.append(_Op(op.code, op.k, op.jt))

    _tree(asm, values, leaf, emit_leaf)


def _port_check(asm: _Asm, ports: list[int], leaf: int, accept: str, maybe: str) -> None:
    """X holds the port (or _NO_PORT): accept a listed port, else go to `maybe`.

    A long list gets its own exits in every leaf: `accept` and `maybe` would be out of 8-bit
    reach of most of its jumps, and a trampoline per jump costs more.
    """
    asm.op(BPF_MISC | BPF_TXA)
    if len(ports) <= _NEAR_PORTS:
        _member(asm, ports, leaf, accept, maybe)
    else:
        _member_local(asm, ports, leaf, _ret(ACCEPT), _Op(BPF_JMP | BPF_JA, 0, maybe))


def _maybe_tail(asm: _Asm, maybe: str, accept: str, drop: str) -> None:
    """Frames with no port reach here by failing every port: they go up for counting."""
    asm.place(maybe)
    asm.jump(BPF_JGT, 0xFFFF, accept, drop)
    asm.place(accept)
    asm.ret(ACCEPT)
    asm.place(drop)
    asm.ret(DROP)


def _vlan_check(asm: _Asm, vlans: list[int], accept: str, drop: str) -> None:
    """3. Keep out every frame with more than one VLAN tag, and tagged frames of VLANs no rule
    names; VLAN id 0 (priority tag only) counts as untagged.

    The kernel moves a received frame's outer 802.1Q/802.1ad tag into metadata before packet
    sockets see it (skb_vlan_untag), so that tag is read with ancillary loads and the frame
    bytes start again with an ethertype, which must not be a second tag. A tag still inline
    (one the kernel did not move) must not be followed by another, and goes to userspace,
    which parses it. Falls through for frames whose ethertype at 12 the rest of the program
    judges.
    """
    untagged, inline, done = asm.label(), asm.label(), asm.label()
    asm.op(BPF_LD | BPF_W | BPF_ABS, SKF_AD_OFF + SKF_AD_VLAN_TAG_PRESENT)
    asm.jump(BPF_JEQ, 0, untagged, None)
    asm.op(BPF_LD | BPF_H | BPF_ABS, 12)  # the ethertype after the moved tag
    asm.jump(BPF_JEQ, 0x8100, drop, None)
    asm.jump(BPF_JEQ, 0x88A8, drop, None)
    asm.op(BPF_LD | BPF_W | BPF_ABS, SKF_AD_OFF + SKF_AD_VLAN_TAG)
    _vlan_id_check(asm, vlans, done, drop)
    asm.place(untagged)
    asm.op(BPF_LD | BPF_H | BPF_ABS, 12)
    asm.jump(BPF_JEQ, 0x8100, inline, None)
    asm.jump(BPF_JEQ, 0x88A8, inline, done)
    asm.place(inline)
    asm.op(BPF_LD | BPF_W | BPF_LEN)
    asm.jump(BPF_JGE, 18, None, accept)  # too short for its tag: userspace counts it
    asm.op(BPF_LD | BPF_H | BPF_ABS, 16)
    asm.jump(BPF_JEQ, 0x8100, drop, None)
    asm.jump(BPF_JEQ, 0x88A8, drop, None)
    asm.op(BPF_LD | BPF_H | BPF_ABS, 14)
    _vlan_id_check(asm, vlans, accept, drop)
    asm.place(done)


def _vlan_id_check(asm: _Asm, vlans: list[int], allowed: str, drop: str) -> None:
    """A holds a tag (TCI): on to ``allowed`` when its VLAN id is 0 (priority bits only) or one
    of ``vlans``, else to ``drop``."""
    asm.op(BPF_ALU | BPF_AND | BPF_K, VLAN_VID_MASK)
    if vlans:
        asm.jump(BPF_JEQ, 0, allowed, None)
        _member(asm, vlans, LEAF, allowed, drop)
    else:
        asm.jump(BPF_JEQ, 0, allowed, drop)


def _program(
    table: dict[int, frozenset[int]], vlans: list[int], mode: str, leaf: int
) -> list[Instruction]:
    asm = _Asm()
    accept, drop = asm.label(), asm.label()
    # 1. never see our own output
    asm.op(BPF_LD | BPF_W | BPF_ABS, SKF_AD_OFF + SKF_AD_PKTTYPE)
    asm.jump(BPF_JEQ, PACKET_OUTGOING, drop, None)
    # 2. too short for Ethernet: userspace counts it
    asm.op(BPF_LD | BPF_W | BPF_LEN)
    asm.jump(BPF_JGE, 14, None, accept)
    # 3. VLAN tags: at most one, of a VLAN some rule names (`_vlan_check`)
    _vlan_check(asm, vlans, accept, drop)
    # 4. other protocols are none of our business
    asm.op(BPF_LD | BPF_H | BPF_ABS, 12)
    if mode == "ipv4":
        asm.jump(BPF_JEQ, 0x0800, accept, drop)
    else:
        asm.jump(BPF_JEQ, 0x0800, None, drop)
        # 5. no room for an IPv4 header: userspace counts it
        asm.op(BPF_LD | BPF_W | BPF_LEN)
        asm.jump(BPF_JGE, 14 + 20, None, accept)
        # 6. destination not configured (cheap range check first: most traffic is elsewhere)
        dsts = sorted(table)
        asm.op(BPF_LD | BPF_W | BPF_ABS, 14 + 16)
        asm.jump(BPF_JGE, dsts[0], None, drop)
        asm.jump(BPF_JGT, dsts[-1], drop, None)
        if mode == "dst":
            _member_local(asm, dsts, leaf, _ret(ACCEPT), _ret(DROP))
        else:
            _classify(asm)
            if mode == "exact":
                _exact(asm, table, leaf)
            else:
                _loose(asm, table, leaf)
    asm.place(accept)
    asm.ret(ACCEPT)
    asm.place(drop)
    asm.ret(DROP)
    return asm.assemble()


def _classify(asm: _Asm) -> None:
    """7. Leave the UDP destination port in X, or _NO_PORT for a fragment, another protocol, a
    bad version/IHL or a frame too short for the UDP header; then A = destination address."""
    no_port, dst = asm.label(), asm.label()
    asm.op(BPF_LD | BPF_H | BPF_ABS, 14 + 6)
    asm.jump(BPF_JSET, 0x3FFF, no_port, None)  # MF or fragment offset
    asm.op(BPF_LD | BPF_B | BPF_ABS, 14 + 9)
    asm.jump(BPF_JEQ, 17, None, no_port)
    asm.op(BPF_LD | BPF_B | BPF_ABS, 14)
    asm.jump(BPF_JGE, 0x45, None, no_port)  # version 4, IHL >= 5
    asm.jump(BPF_JGT, 0x4F, no_port, None)
    asm.op(BPF_LDX | BPF_B | BPF_MSH, 14)  # X = IHL * 4
    asm.op(BPF_LD | BPF_W | BPF_LEN)
    asm.op(BPF_ALU | BPF_SUB | BPF_X)
    asm.jump(BPF_JGE, 14 + 8, None, no_port)  # room for the UDP header
    asm.jump(BPF_JGT, 0x7FFFFFFF, no_port, None)  # len < IHL wrapped around
    asm.op(BPF_LD | BPF_H | BPF_IND, 14 + 2)
    asm.op(BPF_MISC | BPF_TAX)
    asm.ja(dst)
    asm.place(no_port)
    asm.op(BPF_LDX | BPF_W | BPF_IMM, _NO_PORT)
    asm.place(dst)
    asm.op(BPF_LD | BPF_W | BPF_ABS, 14 + 16)


def _exact(asm: _Asm, table: dict[int, frozenset[int]], leaf: int) -> None:
    """8. Search the destination, then that destination's ports.

    Destinations with the same port set share one port check: inline in a leaf of the search,
    or, when several leaves need it and that is shorter, once after the tree behind a `ja`.
    """
    dsts = sorted(table)
    leaves = list(_split(dsts, leaf))
    users: dict[frozenset[int], int] = {}
    for run in leaves:
        for ports in {table[d] for d in run}:
            users[ports] = users.get(ports, 0) + 1
    shared = {
        ports: asm.label()
        for ports, m in users.items()
        if m + 4 + len(ports) < m * (1 + len(ports))  # one `ja` per leaf + one check + tail
    }

    def emit_leaf(run: list[int]) -> None:
        targets: dict[frozenset[int], str] = {}
        for d in run:
            targets.setdefault(table[d], asm.label())
        accept, maybe, drop = asm.label(), asm.label(), asm.label()
        for d in run[:-1]:
            asm.jump(BPF_JEQ, d, targets[table[d]], None)
        asm.jump(BPF_JEQ, run[-1], targets[table[run[-1]]], drop)
        inline = False
        for ports, label in targets.items():
            asm.place(label)
            if ports in shared:
                asm.ja(shared[ports])
            else:
                _port_check(asm, sorted(ports), leaf, accept, maybe)
                inline = True
        if inline:
            _maybe_tail(asm, maybe, accept, drop)
        else:
            asm.place(drop)
            asm.ret(DROP)

    _tree(asm, dsts, leaf, emit_leaf)
    for ports, label in shared.items():
        accept, maybe, drop = asm.label(), asm.label(), asm.label()
        asm.place(label)
        _port_check(asm, sorted(ports), leaf, accept, maybe)
        _maybe_tail(asm, maybe, accept, drop)


def _loose(asm: _Asm, table: dict[int, frozenset[int]], leaf: int) -> None:
    """8, loosely: destination configured and port configured for any destination."""
    ports_check = asm.label()
    _member_local(asm, sorted(table), leaf, _Op(BPF_JMP | BPF_JA, 0, ports_check), _ret(DROP))
    accept, maybe, drop = asm.label(), asm.label(), asm.label()
    asm.place(ports_check)
    _port_check(asm, sorted(set().union(*table.values())), leaf, accept, maybe)
    _maybe_tail(asm, maybe, accept, drop)


def _ret(k: int) -> _Op:
    return _Op(BPF_RET | BPF_K, k)


def drop_all() -> list[Instruction]:
    """A program that keeps nothing: for sockets that exist only to hold group memberships."""
    return [(BPF_RET | BPF_K, 0, 0, DROP)]


def compile_filter(
    pairs: Iterable[tuple[str, int]],
    *,
    vlans: Iterable[int] = (),
    max_insns: int = BPF_MAXINSNS,
) -> list[Instruction]:
    """A filter for (destination address, destination port) pairs, in at most `max_insns`.

    `vlans` are the VLAN ids (1-4094) rules on this interface name. In order: the host's own
    output → drop; shorter than Ethernet → accept; more than one VLAN tag → drop; a tag of a
    VLAN not in `vlans` → drop; an inline tag (one the kernel left in the frame) → accept;
    not IPv4 → drop; shorter than an IPv4 header → accept; destination not configured →
    drop; fragment, not UDP, bad version/IHL or no room for the UDP header → accept; port
    configured for that destination → accept, else drop. No pairs → drop everything.

    Destinations and ports are binary-searched, so a frame costs tens of instructions even with
    thousands of pairs. When the exact program does not fit, looser ones are tried: any
    configured port on any configured destination, then any configured destination, then any
    IPv4 frame. Looser is still correct because userspace matches every frame exactly; it only
    costs CPU. Lower `max_insns` if attaching fails with ENOMEM (net.core.optmem_max); the last
    resort (about 30 instructions) is returned whatever `max_insns` says.
    """
    vlan_ids = sorted(set(vlans))
    if any(not 1 <= v <= 4094 for v in vlan_ids):
        raise ValueError(f"VLAN id out of range: {vlan_ids}")
    table_sets: dict[int, set[int]] = {}
    for addr, port in pairs:
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"port out of range: {port}")
        table_sets.setdefault(int(ipaddress.IPv4Address(addr)), set()).add(port)
    if not table_sets:
        return drop_all()
    table = {d: frozenset(p) for d, p in table_sets.items()}
    n_ports = len(set().union(*table.values()))
    attempts = [("exact", LEAF, n_ports), ("exact", 4 * LEAF, n_ports)]
    attempts += [("loose", LEAF, n_ports), ("loose", 4 * LEAF, n_ports)]
    attempts += [("dst", LEAF, 0), ("dst", 8 * LEAF, 0)]
    for mode, leaf, floor in attempts:
        if len(table) + floor > max_insns:  # cannot fit: don't bother generating
            continue
        program = _program(table, vlan_ids, mode, leaf)
        if len(program) <= max_insns:
            return program
    return _program(table, vlan_ids, "ipv4", LEAF)


_SOCK_FILTER = struct.Struct("=HBBI")  # struct sock_filter
_SOCK_FPROG = struct.Struct("@HP")  # struct sock_fprog: unsigned short len, then a pointer


def attach(sock: socket.socket, program: list[Instruction]) -> None:
    """Attach (or atomically replace) the socket's filter; OSError if the kernel refuses it."""
    if not 1 <= len(program) <= BPF_MAXINSNS:
        raise ValueError(f"a classic BPF program has 1..{BPF_MAXINSNS} instructions")
    code = b"".join(_SOCK_FILTER.pack(c, jt, jf, k) for c, jt, jf, k in program)
    buffer = ctypes.create_string_buffer(code, len(code))  # alive until the kernel copied it
    fprog = _SOCK_FPROG.pack(len(program), ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    del buffer
