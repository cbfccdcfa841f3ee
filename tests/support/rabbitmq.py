"""A RabbitMQ virtual host of a test's own, so that its workers and queues (tasklab's fixed
queue names) meet no other test's on the shared server."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

CTL_TIMEOUT_S = 30.0


def _ctl(*args: str) -> bool:
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        return False
    try:
        done = subprocess.run([ctl, *args], capture_output=True, timeout=CTL_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@contextlib.contextmanager
def own_vhost(url: str) -> Iterator[str]:
    """``url`` on a fresh virtual host (deleted afterwards) when ``rabbitmqctl`` can make
    one here; else ``url`` itself (a CI service container has no rabbitmqctl)."""
    parts = urlsplit(url)
    user = parts.username or "guest"
    vhost = f"tasklab-test-{uuid.uuid4().hex[:8]}"
    if not (
        _ctl("add_vhost", vhost) and _ctl("set_permissions", "-p", vhost, user, ".*", ".*", ".*")
    ):
        _ctl("delete_vhost", vhost)
        yield url
        return
    try:
        yield urlunsplit(parts._replace(path=f"/{vhost}"))
    finally:
        _ctl("delete_vhost", vhost)
