"""One router per resource; ``ROUTERS`` is what ``create_app`` includes."""

from tasklab.service.routes import data_sync, jobs, metrics, ops, orders, points, products

ROUTERS = [
    ops.router,
    products.router,
    points.router,
    orders.router,
    jobs.router,
    data_sync.router,
    metrics.router,
]
