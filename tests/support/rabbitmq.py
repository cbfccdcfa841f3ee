"""RabbitMQ for tests: a virtual host of a test's own on the shared server, so that its
workers and queues (tasklab's fixed queue names) meet no other test's; and a node of the
session's own with the management plugin, when the shared server has it off."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx

from tasklab.embedded import free_port

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


RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
BOOT_TIMEOUT_S = 90.0


def management_answers(base_url: str, user: str = "guest", password: str = "guest") -> bool:
    try:
        response = httpx.get(f"{base_url}/api/overview", auth=(user, password), timeout=2.0)
    except httpx.HTTPError:
        return False
    return response.status_code == 200


class ManagedRabbitMQ:
    """A RabbitMQ node of the test session's own, with the management plugin, on free ports
    under ``directory`` (the shared server's plugins are not ours to turn on)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.amqp_port, self.management_port, self.dist_port = (free_port() for _ in range(3))
        self.name = f"tasklab-test-{uuid.uuid4().hex[:8]}@localhost"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}//"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.management_port}"

    def start(self) -> None:
        d = self.directory
        d.mkdir(parents=True, exist_ok=True)
        (d / "enabled_plugins").write_text("[rabbitmq_management].\n")
        (d / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}\n"
            f"management.tcp.port = {self.management_port}\n"
            "management.tcp.ip = 127.0.0.1\n"
            # statistics every second (default 5 s): the test waits less for its figures
            "collect_statistics_interval = 1000\n"
        )
        env = {
            **os.environ,
            "HOME": str(d),  # its own Erlang cookie
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(d / "plugins-expand"),
            "RABBITMQ_FEATURE_FLAGS_FILE": str(d / "feature_flags"),
            "RABBITMQ_PID_FILE": str(d / "pid"),
        }
        with (d / "server.log").open("ab") as log:
            self.process = subprocess.Popen(
                [str(RABBITMQ_SERVER)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # stop() ends its whole process group
            )
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while not management_answers(self.management_url):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"RabbitMQ did not start; see {d / 'server.log'}")
            time.sleep(0.5)

    def stop(self) -> None:
        """SIGKILL, not a clean shutdown (6-12 s, at the end of a test session): nothing
        outlives the node, whose data is its temp folder's."""
        process, self.process = self.process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
