"""``tasklab status``: one look at workers, queues, jobs and the fallback state."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table

from tasklab.celery_app import make_celery
from tasklab.database import make_engine
from tasklab.observe.queues import QueueProbe
from tasklab.settings import Settings, mask_url

INSPECT_TIMEOUT_S = 1.0


def collect_status(settings: Settings) -> dict[str, Any]:
    """A JSON-able report; each part says ``error`` instead of failing the whole report."""
    report: dict[str, Any] = {
        "broker": mask_url(settings.effective_broker_url),
        "database": mask_url(settings.sync_database_url),
    }
    report["workers"] = _workers(settings)
    engine = make_engine(settings)
    probe = QueueProbe(settings, engine=engine)
    try:
        snap = probe.snapshot()
        report["queues"] = {
            q: {
                "depth": d.total,
                "by_priority": {str(p): n for p, n in d.by_priority.items()},
                "oldest_job_age_s": round(snap.oldest_age_s.get(q, 0.0), 3),
            }
            for q, d in snap.depths.items()
        }
        report["unacked"] = snap.unacked
        report["jobs"] = snap.jobs_by_status
        report["broker_reachable"] = True
    except Exception as e:  # broker down: say so, keep the rest of the report
        report["broker_reachable"] = False
        report["broker_error"] = f"{type(e).__name__}: {e}"
        report.setdefault("jobs", {})
    finally:
        probe.close()
        engine.dispose()
    # Fallback is active while jobs wait in SQL for the broker or run locally.
    report["fallback_active"] = (
        not report["broker_reachable"] or report["jobs"].get("PENDING", 0) > 0
    )
    return report


def _workers(settings: Settings) -> list[dict[str, Any]]:
    app = make_celery(settings, include=[], for_publishing=True)
    try:
        inspect = app.control.inspect(timeout=INSPECT_TIMEOUT_S)
        stats = inspect.stats() or {}
        active = inspect.active() or {}
    except Exception:  # broker unreachable
        return []
    finally:
        app.close()
    return [
        {
            "name": name,
            "processes": len(s.get("pool", {}).get("processes", [])),
            "active": len(active.get(name, [])),
            "processed": sum((s.get("total") or {}).values()),
            "prefetch_count": s.get("prefetch_count"),
        }
        for name, s in sorted(stats.items())
    ]


def render_status(report: dict[str, Any]) -> Group:
    workers = Table(title=f"workers ({len(report['workers'])} up)")
    for col in ("worker", "processes", "active", "processed", "prefetch"):
        workers.add_column(col)
    for w in report["workers"]:
        workers.add_row(
            w["name"],
            str(w["processes"]),
            str(w["active"]),
            str(w["processed"]),
            str(w["prefetch_count"]),
        )
    queues = Table(title="queues")
    for col in ("queue", "waiting", "oldest job age (s)"):
        queues.add_column(col)
    for name, q in report.get("queues", {}).items():
        queues.add_row(name, str(q["depth"]), f"{q['oldest_job_age_s']:.1f}")
    jobs = Table(title="jobs by status")
    jobs.add_column("status")
    jobs.add_column("count", justify="right")
    for status, n in sorted(report["jobs"].items()):
        jobs.add_row(status, str(n))
    state = Table(show_header=False, title="state")
    state.add_row(
        "broker",
        f"{report['broker']} " + ("(reachable)" if report["broker_reachable"] else "(UNREACHABLE)"),
    )
    state.add_row("unacked messages", str(report.get("unacked")))
    state.add_row("fallback active", "YES" if report["fallback_active"] else "no")
    return Group(state, workers, queues, jobs)
