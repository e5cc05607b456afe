"""The linux identity provider's commands (`ip`, `hostname`): a hung one is killed and fails the
takeover with its name, rather than hold the HA loop for ever."""
from __future__ import annotations

import asyncio
import logging

import psutil
import pytest

from engine.identity import linux


def test_a_command_that_hangs_is_killed_and_fails_with_its_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linux, "COMMAND_TIMEOUT", 0.3)
    with pytest.raises(OSError, match=r"^sleep 30 did not finish in 0.3 s \(killed\)$"):
        asyncio.run(linux._run("sleep", "30"))
    assert [p for p in psutil.Process().children() if p.name() == "sleep"] == []


def test_a_command_that_fails_names_itself_and_what_it_said() -> None:
    with pytest.raises(OSError, match=r"^sh -c echo no such device >&2; exit 2 failed: no such device$"):
        asyncio.run(linux._run("sh", "-c", "echo no such device >&2; exit 2"))


def test_unchecked_a_failure_is_expected_and_a_hang_is_logged(monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(linux, "COMMAND_TIMEOUT", 0.3)
    with caplog.at_level(logging.WARNING, logger="nf.identity"):
        asyncio.run(linux._run("false", check=False))  # deleting an address not held: no news
        assert caplog.messages == []
        asyncio.run(linux._run("sleep", "30", check=False))
    assert caplog.messages == ["sleep 30 did not finish in 0.3 s (killed)"]
