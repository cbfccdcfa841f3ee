from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tasklab.errors import PortTaken
from tasklab.ports import MachinePortLock, PortWish, listens, port_is_free, take_port


@contextmanager
def listening() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def test_a_default_port_that_is_taken_gives_way_to_a_free_one_and_says_so() -> None:
    notes: list[str] = []
    with listening() as taken:
        port = take_port("127.0.0.1", "exporter", PortWish(taken), notes)
        assert port != taken and port_is_free("127.0.0.1", port)
    assert notes == [f"exporter port {taken} is in use, took {port}"]


def test_a_free_default_port_is_kept() -> None:
    with listening() as port:
        pass
    notes: list[str] = []
    assert take_port("127.0.0.1", "API", PortWish(port), notes) == port and notes == []


def test_a_chosen_port_that_is_taken_fails_naming_where_it_was_chosen() -> None:
    with listening() as taken, pytest.raises(PortTaken, match=f"port {taken} .*--port"):
        take_port("127.0.0.1", "API", PortWish(taken, "--port"), [])


def test_a_listening_port_is_seen_without_taking_it() -> None:
    with listening() as port:
        assert listens("127.0.0.1", port) and listens("0.0.0.0", port)
    assert not listens("127.0.0.1", port)


def test_the_machine_lock_is_let_go_once_the_ports_listen(tmp_path: Path) -> None:
    first = MachinePortLock(tmp_path / "ports.lock")
    first.acquire()
    with listening() as port:
        first.release_when_listening("127.0.0.1", [port], threading.Event())
        second = MachinePortLock(tmp_path / "ports.lock")
        second.acquire()  # returns once the first lets go
        assert first._file is None
        second.release()


def test_port_0_takes_a_free_port_without_a_note() -> None:
    notes: list[str] = []
    assert take_port("127.0.0.1", "API", PortWish(0, "--port"), notes) > 0 and notes == []
