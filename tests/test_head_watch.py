"""The Ray head's watch (sweep/head_watch.py): a head that stops answering ends the driver in
one line with the command that continues the sweep; one that answers is left alone."""

from __future__ import annotations

import socket
import threading

import pytest

from segsweep.sweep import head_watch


def test_a_head_that_stops_answering_is_said_in_one_line_with_the_resume_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(head_watch, "HEAD_LOST_S", 0.5)
    monkeypatch.setattr(head_watch, "PROBE_EVERY_S", 0.1)
    head = socket.create_server(("127.0.0.1", 0))
    address = f"127.0.0.1:{head.getsockname()[1]}"
    said: list[str] = []
    gone = threading.Event()
    command = head_watch.resume_command(
        ["sweep", "s.yaml", "--ray-address", address, "--tracking-uri", "http://bob:hunter2@mlflow:5000"]
    )
    stop = head_watch.watch_head(address, command, gone=lambda line: (said.append(line), gone.set()))
    assert not gone.wait(1.0)  # it answers: nothing said
    head.close()  # the head is lost
    assert gone.wait(5.0)
    stop.set()
    [line] = said
    assert line.startswith(f"error: the Ray head at {address} is gone (")
    assert line.endswith(
        f"segsweep sweep s.yaml --ray-address {address} --tracking-uri 'http://bob:***@mlflow:5000' --resume"
    )
    assert "hunter2" not in line


def test_a_watch_stopped_says_nothing_and_other_addresses_are_not_watched(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(head_watch, "HEAD_LOST_S", 0.3)
    monkeypatch.setattr(head_watch, "PROBE_EVERY_S", 0.1)
    said: list[str] = []
    stop = head_watch.watch_head("127.0.0.1:9", "x", gone=said.append)  # nothing listens there
    stop.set()
    for address in ("auto", "ray://127.0.0.1:9"):
        assert head_watch.watch_head(address, "x", gone=said.append).is_set() is False
    threading.Event().wait(0.8)
    assert said == []
