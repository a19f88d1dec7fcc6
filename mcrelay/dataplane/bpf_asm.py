"""Classic BPF as the kernel takes it: the opcodes of linux/filter.h, an assembler with labels,
and attaching a program to a socket.

This is the layer below `mcrelay.dataplane.bpf`, which decides what a capture socket's filter
says; here is only how any program is written down. Classic BPF jumps forward only, by at most
255 instructions on a conditional, so `Assembler` lets code name its targets and fixes up the
offsets (with trampolines where a target is too far) once the program is complete.
"""

from __future__ import annotations

import ctypes
import dataclasses
import socket
import struct

from mcrelay.system.linux import SO_ATTACH_FILTER

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

_MAX_JUMP = 255  # jt/jf are 8 bits; `ja` is 32


@dataclasses.dataclass(slots=True)
class Op:
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


class Assembler:
    """Emit instructions with symbolic forward jumps; `assemble` resolves them."""

    def __init__(self) -> None:
        self.items: list[Op | str] = []  # a str marks where a label points
        self._labels = 0

    def label(self) -> str:
        self._labels += 1
        return f"L{self._labels}"

    def place(self, label: str) -> None:
        self.items.append(label)

    def op(self, code: int, k: int = 0) -> None:
        self.items.append(Op(code, k & 0xFFFFFFFF))

    def jump(self, code: int, k: int, jt: str | None, jf: str | None) -> None:
        self.items.append(Op(BPF_JMP | code | BPF_K, k, jt, jf))

    def ja(self, target: str) -> None:
        self.items.append(Op(BPF_JMP | BPF_JA, 0, target))

    def ret(self, k: int) -> None:
        self.items.append(Op(BPF_RET | BPF_K, k))

    def assemble(self) -> list[Instruction]:
        """Resolve labels; a conditional jump too far for 8 bits gets a trampoline after it.

        The trampoline is a copy of the target when that is a `ret` or `ja`, else a `ja` to it.
        Inserting trampolines only lengthens other jumps, so repeating until none is too far
        terminates.
        """
        items = self.items
        while True:
            pos, at = _layout(items)
            out: list[Op | str] = []
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
                out[-1] = new = Op(item.code, item.k)
                new.jt = self._trampoline(out, at[jt], jt) if jt_far else jt
                new.jf = self._trampoline(out, at[jf], jf) if jf_far else jf
                out.append(after)
            if len(out) == len(items):
                break
            items = out
        self.items = items
        return _encode(items)

    def _trampoline(self, out: list[Op | str], target: Op, label: str) -> str:
        """Append a stand-in for a jump to `label` (pointing at `target`); return its label."""
        here = self.label()
        out.append(here)
        if target.is_terminal:
            out.append(Op(target.code, target.k, target.jt))
        else:
            out.append(Op(BPF_JMP | BPF_JA, 0, label))
        return here


def _layout(items: list[Op | str]) -> tuple[dict[str, int], dict[str, Op]]:
    """Label → instruction index, and label → the instruction it points at."""
    pos: dict[str, int] = {}
    at: dict[str, Op] = {}
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


def _encode(items: list[Op | str]) -> list[Instruction]:
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


SOCK_FILTER = struct.Struct("=HBBI")  # struct sock_filter
_SOCK_FPROG = struct.Struct("@HP")  # struct sock_fprog: unsigned short len, then a pointer


def attach(sock: socket.socket, program: list[Instruction]) -> None:
    """Attach (or atomically replace) the socket's filter; OSError if the kernel refuses it."""
    if not 1 <= len(program) <= BPF_MAXINSNS:
        raise ValueError(f"a classic BPF program has 1..{BPF_MAXINSNS} instructions")
    code = b"".join(SOCK_FILTER.pack(c, jt, jf, k) for c, jt, jf, k in program)
    buffer = ctypes.create_string_buffer(code, len(code))  # alive until the kernel copied it
    fprog = _SOCK_FPROG.pack(len(program), ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    del buffer
