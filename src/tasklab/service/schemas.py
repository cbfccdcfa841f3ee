"""Request and response bodies. Requests are strict: unknown fields, wrong types (``"5"`` for
5, ``true`` for 1) and out-of-range numbers are refused with 422 naming the field. An integral
JSON number such as ``7.0`` is an integer (as JSON Schema says) and is accepted as 7."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

MAX_ID = 2**31 - 1  # 32-bit ids in the database: larger ones cannot exist
MAX_QUANTITY = 1000
MAX_ITEMS = 100
MAX_USE_POINTS = 100_000_000
MAX_SYNC_LIMIT = 1000
MAX_PRIORITY = 9
DEFAULT_PRIORITY = 5
PLATFORM_PATTERN = r"^[a-z0-9_-]+$"

T = TypeVar("T")


def _integral(value: Any) -> Any:
    """7.0 -> 7 (JSON Schema's "integer" includes it); anything else is left to strict
    validation, which refuses strings, booleans and fractions."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Integer = Annotated[int, BeforeValidator(_integral)]


class RequestBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class OrderLineIn(RequestBody):
    product_id: Integer = Field(ge=1, le=MAX_ID, examples=[1])
    quantity: Integer = Field(ge=1, le=MAX_QUANTITY, examples=[1])


class OrderIn(RequestBody):
    items: list[OrderLineIn] = Field(min_length=1, max_length=MAX_ITEMS)
    use_points: Integer = Field(
        0, ge=0, le=MAX_USE_POINTS, description="Points to pay with; one point is one cent."
    )


class SyncBatchIn(RequestBody):
    platform: str = Field(
        min_length=1, max_length=32, pattern=PLATFORM_PATTERN, examples=["shopify"]
    )
    limit: Integer = Field(10, ge=1, le=MAX_SYNC_LIMIT, description="At most this many files.")
    priority: Integer = Field(
        DEFAULT_PRIORITY, ge=0, le=MAX_PRIORITY, description="0 least .. 9 most urgent."
    )


class SyncFileIn(RequestBody):
    file_id: Integer = Field(ge=1, le=MAX_ID, examples=[1])
    priority: Integer = Field(DEFAULT_PRIORITY, ge=0, le=MAX_PRIORITY)


# --- responses ---------------------------------------------------------------------------------


class Page(BaseModel, Generic[T]):
    items: list[T]
    page: int
    page_size: int
    total: int


class Product(BaseModel):
    id: int
    name: str
    category: str
    price: float
    price_cents: int
    stock: int


class PointsBalance(BaseModel):
    user_id: int
    balance: int
    updated_at: datetime | None


class LedgerEntry(BaseModel):
    id: int
    delta: int
    kind: str
    order_id: int | None
    expires_at: datetime | None
    created_at: datetime


class ExpiringGrant(BaseModel):
    entry_id: int
    points: int
    expires_at: datetime


class ExpiringPoints(BaseModel):
    user_id: int
    days: int
    total: int = Field(description="Points expiring in the window (never above the balance).")
    items: list[ExpiringGrant]


class OrderAccepted(BaseModel):
    order_id: int
    job_id: str | None
    status: Literal["pending", "paid", "rejected", "cancelled", "refunded"]


class OrderLine(BaseModel):
    product_id: int
    quantity: int
    unit_price: float


class Order(BaseModel):
    id: int
    status: Literal["pending", "paid", "rejected", "cancelled", "refunded"]
    reason: Literal["out_of_stock", "insufficient_points", "settlement_failed"] | None = Field(
        description="Why a rejected order was rejected: out of stock, not enough points, or "
        "its settlement job gave up (dead or cancelled; nothing was taken, and retrying that "
        "job may still settle it). Null unless rejected."
    )
    items: list[OrderLine]
    use_points: int
    total: float
    total_cents: int
    job_id: str | None
    created_at: datetime
    updated_at: datetime


class JobProgress(BaseModel):
    current: int | None
    total: int | None
    message: str | None


class JobView(BaseModel):
    job_id: str
    task: str
    status: str
    queue: str
    priority: int
    attempt: int
    max_attempts: int
    progress: JobProgress
    result: Any
    error: str | None
    via: str
    celery_task_id: str | None
    created_at: datetime
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None


class JobAccepted(BaseModel):
    job_id: str
    celery_task_id: str | None
    status: str


class Health(BaseModel):
    status: Literal["ok"]


class Check(BaseModel):
    ok: bool
    detail: str | None = None


class Ready(BaseModel):
    status: Literal["ok", "degraded"]
    checks: dict[str, Check]


class FieldProblem(BaseModel):
    field: str = Field(description="The field at fault, dotted: items.0.quantity")
    location: Literal["body", "query", "path", "header", "cookie"]
    message: str
    type: str


class Problem(BaseModel):
    """RFC 9457 problem details (``application/problem+json``)."""

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None
    errors: list[FieldProblem] | None = None
    retry_after_s: int | None = Field(None, description="On 429: as the Retry-After header.")
