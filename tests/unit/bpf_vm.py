"""A small classic-BPF interpreter that behaves like the kernel's (an out-of-bounds load ends the
program with 0), the kernel's checks on a program, and `spec_accepts`, which restates the rules of
`compile_filter` plainly: what the filter tests run generated programs against.
"""

from __future__ import annotations

import ipaddress
import operator
import struct

from mcrelay.dataplane import bpf_asm
from mcrelay.dataplane.bpf_asm import (
    BPF_A,
    BPF_ABS,
    BPF_ALU,
    BPF_IMM,
    BPF_IND,
    BPF_JMP,
    BPF_LD,
    BPF_LDX,
    BPF_LEN,
    BPF_MAXINSNS,
    BPF_MEM,
    BPF_MISC,
    BPF_MSH,
    BPF_RET,
    BPF_ST,
    BPF_STX,
    BPF_X,
    Instruction,
)
from mcrelay.dataplane.parse import inline_vlan
from mcrelay.system.linux import PACKET_MULTICAST, PACKET_OUTGOING

U32 = 0xFFFFFFFF
_SIZES = {0x00: 4, 0x08: 2, 0x10: 1}
_ALU = {
    0x00: operator.add,
    0x10: operator.sub,
    0x20: operator.mul,
    0x30: operator.floordiv,
    0x40: operator.or_,
    0x50: operator.and_,
    0x60: operator.lshift,
    0x70: operator.rshift,
    0x90: operator.mod,
    0xA0: operator.xor,
}


TAGS = (b"\x81\x00", b"\x88\xa8")


def run(
    program: list[Instruction],
    frame: bytes,
    pkttype: int = PACKET_MULTICAST,
    tci: int | None = None,
) -> int:
    """Classic BPF as the kernel runs it on a SOCK_RAW packet socket; `tci` is the outer tag
    the kernel moved out of the frame (skb_vlan_untag), None for a frame without one."""
    a = x = 0
    mem = [0] * 16
    pc = 0
    n = len(frame)
    while True:
        code, jt, jf, k = program[pc]
        pc += 1
        cls = code & 0x07
        if cls == BPF_LD:
            mode = code & 0xE0
            if mode in (BPF_ABS, BPF_IND):
                if mode == BPF_ABS and k >= (bpf_asm.SKF_AD_OFF & U32):
                    a = {
                        bpf_asm.SKF_AD_PKTTYPE: pkttype,
                        bpf_asm.SKF_AD_VLAN_TAG: tci or 0,
                        bpf_asm.SKF_AD_VLAN_TAG_PRESENT: int(tci is not None),
                    }[k - (bpf_asm.SKF_AD_OFF & U32)]
                    continue
                offset = k if mode == BPF_ABS else (x + k) & U32
                size = _SIZES[code & 0x18]
                if offset + size > n:
                    return 0
                a = int.from_bytes(frame[offset : offset + size], "big")
            elif mode == BPF_IMM:
                a = k
            elif mode == BPF_LEN:
                a = n
            elif mode == BPF_MEM:
                a = mem[k]
            else:
                raise AssertionError(f"bad ld {code:#x}")
        elif cls == BPF_LDX:
            mode = code & 0xE0
            if mode == BPF_IMM:
                x = k
            elif mode == BPF_LEN:
                x = n
            elif mode == BPF_MEM:
                x = mem[k]
            elif mode == BPF_MSH:
                if k >= n:
                    return 0
                x = (frame[k] & 0x0F) * 4
            else:
                raise AssertionError(f"bad ldx {code:#x}")
        elif cls == BPF_ST:
            mem[k] = a
        elif cls == BPF_STX:
            mem[k] = x
        elif cls == BPF_ALU:
            operand = x if code & BPF_X else k
            op = code & 0xF0
            if op in (0x30, 0x90) and operand == 0:  # div, mod by zero
                return 0
            a = -a & U32 if op == 0x80 else _ALU[op](a, operand) & U32
        elif cls == BPF_JMP:
            op = code & 0xF0
            if op == 0x00:
                pc += k
                continue
            operand = x if code & BPF_X else k
            taken = {
                0x10: a == operand,
                0x20: a > operand,
                0x30: a >= operand,
                0x40: bool(a & operand),
            }[op]
            pc += jt if taken else jf
        elif cls == BPF_RET:
            return a if code & 0x18 == BPF_A else k
        elif cls == BPF_MISC:
            if code & 0xF8 == 0x00:
                x = a
            elif code & 0xF8 == 0x80:
                a = x
            else:
                raise AssertionError(f"bad misc {code:#x}")


def check_program(program: list[Instruction]) -> None:
    """What the kernel's bpf_check_classic insists on, for the opcodes we emit."""
    assert 1 <= len(program) <= BPF_MAXINSNS
    for pc, (code, jt, jf, k) in enumerate(program):
        assert 0 <= code <= 0xFFFF
        assert 0 <= k <= U32
        assert 0 <= jt <= 255
        assert 0 <= jf <= 255
        if code == BPF_JMP:  # ja
            assert pc + 1 + k < len(program)
        elif code & 0x07 == BPF_JMP:
            assert pc + 1 + max(jt, jf) < len(program)
    assert program[-1][0] & 0x07 == BPF_RET


def spec_accepts(
    frame: bytes,
    pkttype: int,
    table: dict[bytes, set[int]],
    vlans: frozenset[int] = frozenset(),
    tci: int | None = None,
) -> bool:
    """compile_filter's rules, written down plainly."""
    if pkttype == PACKET_OUTGOING:
        return False
    if len(frame) < 14:
        return True
    ethertype = frame[12:14]
    if tci is not None:
        if ethertype in TAGS or tci & 0xFFF not in vlans | {0}:
            return False  # a second tag, or another VLAN
    elif ethertype in TAGS:
        if len(frame) < 18:
            return True
        if frame[16:18] in TAGS:
            return False
        return inline_vlan(frame) in vlans | {0}
    if ethertype != b"\x08\x00":
        return False
    if len(frame) < 34:
        return True
    dst = frame[30:34]
    if dst not in table:
        return False
    ihl = (frame[14] & 0x0F) * 4
    if (
        struct.unpack_from("!H", frame, 20)[0] & 0x3FFF
        or frame[23] != 17
        or frame[14] >> 4 != 4
        or ihl < 20
        or len(frame) < 14 + ihl + 8
    ):
        return True
    return struct.unpack_from("!H", frame, 14 + ihl + 2)[0] in table[dst]


def table_of(pairs: list[tuple[str, int]]) -> dict[bytes, set[int]]:
    table: dict[bytes, set[int]] = {}
    for addr, port in pairs:
        table.setdefault(ipaddress.IPv4Address(addr).packed, set()).add(port)
    return table
