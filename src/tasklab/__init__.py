"""tasklab: a fast, observable, loss-free Celery job layer, and the measurements to prove it."""

from tasklab.celery_app import make_celery
from tasklab.errors import (
    BrokerUnavailable,
    CacheError,
    ConfigError,
    JobError,
    JobNotFound,
    TasklabError,
)
from tasklab.settings import Settings, load_settings

__all__ = [
    "BrokerUnavailable",
    "CacheError",
    "ConfigError",
    "JobError",
    "JobNotFound",
    "Settings",
    "TasklabError",
    "load_settings",
    "make_celery",
]
__version__ = "0.1.0"
