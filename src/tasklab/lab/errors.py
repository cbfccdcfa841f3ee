"""Errors the lab raises on purpose; all are ``TasklabError`` so the CLI maps them once."""

from __future__ import annotations

from tasklab.errors import TasklabError


class LabError(TasklabError):
    """A lab command cannot run as asked (bad option, stack did not start, no result)."""


class TargetError(LabError):
    """A ``--target`` override is malformed."""


class WorkersNotReady(LabError):
    """Worker processes did not answer a ping in time (their log tail is in the message)."""
