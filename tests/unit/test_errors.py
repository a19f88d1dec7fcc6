"""mcrelay/errors.py's group helpers, and the console entry point that reports through them."""

from __future__ import annotations

import pytest

from mcrelay import cli
from mcrelay.errors import describe, leaves, split


def test_leaves_are_every_exception_in_order() -> None:
    a, b, c = ValueError("a"), KeyError("b"), OSError("c")
    nested = BaseExceptionGroup("outer", [a, ExceptionGroup("inner", [b, c])])
    assert leaves(nested) == [a, b, c]
    assert leaves(a) == [a]
    assert describe(nested) == "a; 'b'; c"
    assert describe(a) == "a"


def test_split_parts_groups_and_plain_exceptions() -> None:
    interrupt, bug = KeyboardInterrupt(), ValueError("bug")
    matched, rest = split(BaseExceptionGroup("", [interrupt, bug]), KeyboardInterrupt)
    assert matched is not None and leaves(matched) == [interrupt]
    assert rest is not None and leaves(rest) == [bug]
    assert split(interrupt, KeyboardInterrupt) == (interrupt, None)
    assert split(bug, KeyboardInterrupt) == (None, bug)


def _exits(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> int:
    def app() -> None:
        raise error

    monkeypatch.setattr(cli, "app", app)
    with pytest.raises(SystemExit) as caught:
        cli.main()
    assert isinstance(caught.value.code, int)
    return caught.value.code


def test_main_reports_every_bug_of_a_group(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    group = ExceptionGroup("", [ValueError("one"), ExceptionGroup("", [KeyError("two")])])
    assert _exits(monkeypatch, group) == 70
    assert capsys.readouterr().err.splitlines() == [
        "mcrelay: internal error: ValueError: one",
        "mcrelay: internal error: KeyError: 'two'",
    ]


def test_main_takes_ctrl_c_off_first(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _exits(monkeypatch, KeyboardInterrupt()) == 130
    assert _exits(monkeypatch, BaseExceptionGroup("", [KeyboardInterrupt()])) == 130
    assert capsys.readouterr().err == ""
    mixed = BaseExceptionGroup("", [KeyboardInterrupt(), RuntimeError("bug")])
    assert _exits(monkeypatch, mixed) == 70
    assert capsys.readouterr().err == "mcrelay: internal error: RuntimeError: bug\n"
