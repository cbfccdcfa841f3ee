"""One error root for tasklab; library code raises these, the edges (CLI, HTTP) map them."""

from __future__ import annotations


class TasklabError(Exception):
    """Root of every error tasklab raises on purpose."""


class ConfigError(TasklabError):
    """A setting is unknown or invalid. ``key`` names the setting at fault."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"{key}: {message}")


class EmbeddedServerError(TasklabError):
    """The embedded Redis server could not be found, started or stopped."""


class BrokerUnavailable(TasklabError):
    """The broker did not accept a message (down, unreachable, or the circuit is open)."""


class JobError(TasklabError):
    """Base for job-layer errors."""


class JobNotFound(JobError):
    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"no job with id {job_id!r}")


class JobStateError(JobError):
    """The requested operation does not apply to the job in its current state."""


class UnknownTask(JobError):
    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"no job task named {name!r} is declared (did you import its module?)")


class UnknownQueue(JobError):
    """A job was sent to a queue no tasklab worker or reaper watches: it would wait for ever."""

    def __init__(self, queue: str, known: tuple[str, ...]) -> None:
        self.queue = queue
        super().__init__(f"unknown queue {queue!r}; tasklab's queues are {', '.join(known)}")


class DatabaseBusy(TasklabError):
    """A write waited longer than its bound for SQLite's write lock."""


class JobDeclarationError(JobError):
    """A ``@job(...)`` declaration used an option tasklab does not know."""


class JobTimeout(JobError):
    """``wait()`` ran out of time before the job finished."""


class StaleAttempt(JobError):
    """A delivery tried to commit effects for an attempt that is no longer current."""


class CacheError(TasklabError):
    """Base for cache errors that reach the caller (serialization, bad configuration)."""


class DatabaseUnavailable(TasklabError):
    """The SQL database did not answer."""


class StackError(TasklabError):
    """The stack that ``tasklab up`` runs cannot be started, found or operated as asked."""


class StackRunning(StackError):
    """A stack already runs with this home folder (one stack per home folder)."""


class PortTaken(StackError):
    """A port the user chose is already in use."""


class NoStackRunning(StackError):
    """No stack runs with this home folder."""
