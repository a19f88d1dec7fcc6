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

This module decides what the filter says; `mcrelay.dataplane.bpf_asm` holds the opcodes and the
assembler it writes with, and `attach`, re-exported here for the filter's users.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable

from mcrelay.dataplane.bpf_asm import (
    BPF_ABS,
    BPF_ALU,
    BPF_AND,
    BPF_B,
    BPF_H,
    BPF_IMM,
    BPF_IND,
    BPF_JA,
    BPF_JEQ,
    BPF_JGE,
    BPF_JGT,
    BPF_JMP,
    BPF_JSET,
    BPF_K,
    BPF_LD,
    BPF_LDX,
    BPF_LEN,
    BPF_MAXINSNS,
    BPF_MISC,
    BPF_MSH,
    BPF_RET,
    BPF_SUB,
    BPF_TAX,
    BPF_TXA,
    BPF_W,
    BPF_X,
    SKF_AD_OFF,
    SKF_AD_PKTTYPE,
    SKF_AD_VLAN_TAG,
    SKF_AD_VLAN_TAG_PRESENT,
    Assembler,
    Instruction,
    Op,
    attach,
)  # fmt: skip
from mcrelay.system.linux import PACKET_OUTGOING

__all__ = ["ACCEPT", "DROP", "Instruction", "attach", "compile_filter", "drop_all"]

VLAN_VID_MASK = 0x0FFF

ACCEPT = 0x40000  # bytes to keep: the whole frame
DROP = 0
LEAF = 8  # a search tree scans at most this many values linearly

_NO_PORT = 0x10000  # X for frames without a readable port: matches no port, fails the tree
_NEAR_PORTS = 128  # a port list this short keeps its exits within a conditional jump's 255


# ---- code generation -------------------------------------------------------------------------


def _split(values: list[int], leaf: int) -> Iterable[list[int]]:
    """The leaves `_tree` produces for these values, in order."""
    if len(values) <= leaf:
        yield values
        return
    mid = len(values) // 2
    yield from _split(values[:mid], leaf)
    yield from _split(values[mid:], leaf)


def _tree(
    asm: Assembler, values: list[int], leaf: int, emit_leaf: Callable[[list[int]], None]
) -> None:
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


def _member(asm: Assembler, values: list[int], leaf: int, yes: str, no: str) -> None:
    """Jump to `yes` if A is in `values`, else to `no`."""

    def emit_leaf(run: list[int]) -> None:
        for value in run[:-1]:
            asm.jump(BPF_JEQ, value, yes, None)
        asm.jump(BPF_JEQ, run[-1], yes, no)

    _tree(asm, values, leaf, emit_leaf)


def _member_local(asm: Assembler, values: list[int], leaf: int, yes: Op, no: Op) -> None:
    """`_member` whose leaves end in their own copies of the terminal `yes` and `no`."""

    def emit_leaf(run: list[int]) -> None:
        y, n = asm.label(), asm.label()
        for value in run[:-1]:
            asm.jump(BPF_JEQ, value, y, None)
        asm.jump(BPF_JEQ, run[-1], y, n)
        for label, op in ((y, yes), (n, no)):
            asm.place(label)
            asm.items.append(Op(op.code, op.k, op.jt))

    _tree(asm, values, leaf, emit_leaf)


def _port_check(asm: Assembler, ports: list[int], leaf: int, accept: str, maybe: str) -> None:
    """X holds the port (or _NO_PORT): accept a listed port, else go to `maybe`.

    A long list gets its own exits in every leaf: `accept` and `maybe` would be out of 8-bit
    reach of most of its jumps, and a trampoline per jump costs more.
    """
    asm.op(BPF_MISC | BPF_TXA)
    if len(ports) <= _NEAR_PORTS:
        _member(asm, ports, leaf, accept, maybe)
    else:
        _member_local(asm, ports, leaf, _ret(ACCEPT), Op(BPF_JMP | BPF_JA, 0, maybe))


def _maybe_tail(asm: Assembler, maybe: str, accept: str, drop: str) -> None:
    """Frames with no port reach here by failing every port: they go up for counting."""
    asm.place(maybe)
    asm.jump(BPF_JGT, 0xFFFF, accept, drop)
    asm.place(accept)
    asm.ret(ACCEPT)
    asm.place(drop)
    asm.ret(DROP)


def _vlan_check(asm: Assembler, vlans: list[int], accept: str, drop: str) -> None:
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


def _vlan_id_check(asm: Assembler, vlans: list[int], allowed: str, drop: str) -> None:
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
    asm = Assembler()
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


def _classify(asm: Assembler) -> None:
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


def _exact(asm: Assembler, table: dict[int, frozenset[int]], leaf: int) -> None:
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


def _loose(asm: Assembler, table: dict[int, frozenset[int]], leaf: int) -> None:
    """8, loosely: destination configured and port configured for any destination."""
    ports_check = asm.label()
    _member_local(asm, sorted(table), leaf, Op(BPF_JMP | BPF_JA, 0, ports_check), _ret(DROP))
    accept, maybe, drop = asm.label(), asm.label(), asm.label()
    asm.place(ports_check)
    _port_check(asm, sorted(set().union(*table.values())), leaf, accept, maybe)
    _maybe_tail(asm, maybe, accept, drop)


def _ret(k: int) -> Op:
    return Op(BPF_RET | BPF_K, k)


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
