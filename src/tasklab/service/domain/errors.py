"""Errors the shop raises; ``tasklab.service.problems`` maps each to one HTTP status."""

from __future__ import annotations

from tasklab.errors import TasklabError


class ShopError(TasklabError):
    """Root of the reference service's domain errors."""


class NotFound(ShopError):
    """The resource does not exist, or belongs to someone else (the same answer for both)."""

    def __init__(self, resource: str, key: object) -> None:
        self.resource = resource
        self.key = key
        super().__init__(f"no {resource} {key!r}")


class InvalidField(ShopError):
    """A well-formed request that refers to something impossible (an unknown product,
    more points than the order costs). ``field`` names the field at fault, dotted."""

    def __init__(self, field: str, message: str, *, kind: str = "invalid") -> None:
        self.field = field
        self.message = message
        self.kind = kind
        super().__init__(f"{field}: {message}")


class IdempotencyConflict(ShopError):
    """An Idempotency-Key was reused with a different request body."""


class Unauthorized(ShopError):
    """No bearer token, or one that matches no user."""


class Forbidden(ShopError):
    """Authenticated, but the resource is for administrators only."""


class SchemaMissing(ShopError):
    """The database answers but the shop's tables are not migrated to the expected head."""


class RateLimited(ShopError):
    """Too many requests for a limit (tasklab.service.rate_limits), or a quota used up."""

    def __init__(self, message: str, *, retry_after_s: int, slug: str = "rate-limited") -> None:
        self.retry_after_s = retry_after_s
        self.slug = slug
        super().__init__(message)


class QuotaExceeded(RateLimited):
    """A user has as many orders or jobs in flight as their quota allows."""

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message, retry_after_s=retry_after_s, slug="quota-exceeded")


class OrderNotCancellable(ShopError):
    """A rejected order took nothing: there is nothing to cancel or refund."""

    def __init__(self, order_id: int, status: str) -> None:
        self.order_id = order_id
        self.status = status
        super().__init__(
            f"order {order_id} is {status}: only pending or paid orders can be taken back"
        )
