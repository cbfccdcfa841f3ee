"""Print shell exports for the test servers that answer on this machine.

Used by ``make test``: a TEST_*_URL already set in the environment is kept as it is.
"""

import os
import socket

SERVICES = {
    "TEST_POSTGRES_URL": (5432, "postgresql://postgres@127.0.0.1:5432/test"),
    # Never db 0 of a shared server: tests use their own database index.
    "TEST_REDIS_URL": (6379, "redis://127.0.0.1:6379/15"),
    "TEST_RABBITMQ_URL": (5672, "amqp://guest:guest@127.0.0.1:5672//"),
}


def answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


for name, (port, url) in SERVICES.items():
    if name in os.environ:
        print(f"export {name}={os.environ[name]}")
    elif answers(port):
        print(f"export {name}={url}")
