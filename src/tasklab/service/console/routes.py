"""The console's pages and actions under ``/console`` (docs/console.md).

Reading pages are GETs rendered on the server (they read without JavaScript; htmx refreshes
their live parts while the tab is visible). Every change is a POST carrying the session's
CSRF token, shown first as a confirmation page, then done and written to the action log.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from tasklab.celery_app import QUEUES
from tasklab.errors import TasklabError
from tasklab.jobs.records import JobStatus
from tasklab.lab.charts import line_chart
from tasklab.lab.report import render_report
from tasklab.lab.results import load_result
from tasklab.service.console import data
from tasklab.service.console.access import COOKIE_NAME, SESSION_TTL_S, Operator, Refused
from tasklab.service.console.state import ConsoleState, console_of, templates
from tasklab.service.rate_limits import address_of
from tasklab.settings import mask_url

router = APIRouter(prefix="/console", include_in_schema=False)
STATIC_DIR = Path(__file__).parent / "static"
STATIC_FILES = {p.name for p in STATIC_DIR.iterdir() if p.is_file()}
CSRF_FIELD = "csrf"


# --- who is asking -------------------------------------------------------------------------


async def current_operator(request: Request) -> Operator:
    access = console_of(request).access
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return await access.operator_for_token(
            header[7:].strip(), address=address_of(request.scope)
        )
    return await access.from_cookie(request.cookies.get(COOKIE_NAME))


async def acting_operator(request: Request) -> Operator:
    """An operator (not a viewer) whose form carries this session's CSRF token."""
    operator = await current_operator(request)
    form = await request.form()
    token = form.get(CSRF_FIELD)
    await console_of(request).access.check_csrf(operator, token if isinstance(token, str) else None)
    if not operator.can_act:
        raise Refused(403, f"{operator.name} may read the console, not act on it")
    return operator


Reader = Annotated[Operator, Depends(current_operator)]
Actor = Annotated[Operator, Depends(acting_operator)]


async def page(request: Request, name: str, operator: Operator | None, **context: Any) -> Response:
    csrf = await console_of(request).access.csrf_token(operator) if operator else ""
    context.update(operator=operator, csrf=csrf, now=time.time(), queues=context.get("queues"))
    return templates.TemplateResponse(
        request, name, context, status_code=context.pop("status", 200)
    )


# --- login ---------------------------------------------------------------------------------


@router.get("/login")
async def login_form(request: Request, next: str = "/console") -> Response:
    return await page(request, "login.html", None, next=_safe_next(next), error=None)


@router.post("/login")
async def login(request: Request) -> Response:
    form = await request.form()
    next_url = _safe_next(str(form.get("next") or "/console"))
    try:
        token = str(form.get("token") or "").strip()
        _, cookie = await console_of(request).access.login(token, address=address_of(request.scope))
    except Refused as e:
        response = await page(
            request, "login.html", None, next=next_url, error=e.reason, status=e.status
        )
        response.headers.update(e.headers or {})
        return response
    response = RedirectResponse(next_url, status_code=303)
    response.set_cookie(
        COOKIE_NAME,
        cookie,
        max_age=int(SESSION_TTL_S),
        path="/console",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/logout")
async def logout(request: Request, operator: Reader) -> Response:
    form = await request.form()
    token = form.get(CSRF_FIELD)
    await console_of(request).access.check_csrf(operator, token if isinstance(token, str) else None)
    response = RedirectResponse("/console/login", status_code=303)
    response.delete_cookie(COOKIE_NAME, path="/console")
    return response


def _safe_next(target: str) -> str:
    """Only back into the console: never an open redirect to another site."""
    return target if target.startswith("/console") and "//" not in target else "/console"


@router.get("/static/{name}")
async def static(name: str, operator: Reader) -> Response:
    if name not in STATIC_FILES:
        raise Refused(404, f"no static file {name!r}")
    return FileResponse(STATIC_DIR / name, headers={"Cache-Control": "private, max-age=3600"})


# --- overview ------------------------------------------------------------------------------


@router.get("")
async def overview(request: Request, operator: Reader) -> Response:
    return await page(request, "overview.html", operator, **await _overview(request))


@router.get("/fragments/overview")
async def overview_fragment(request: Request, operator: Reader) -> Response:
    return await page(request, "_overview.html", operator, **await _overview(request))


async def _overview(request: Request) -> dict[str, Any]:
    console = console_of(request)
    settings = console.services.settings
    now = time.time()
    rows = await run_in_threadpool(console.nodes.queues)
    backlog = console.nodes.backlog()
    finished = await console.sql.read(lambda c: data.finished_last_minute(c, now=now))
    series = await console.sql.read(lambda c: data.throughput_per_minute(c, now=now))
    waits = await console.sql.read(lambda c: data.queue_wait_per_minute(c, now=now))
    breaker = console.services.jobs.publisher.breaker
    return {
        "rows": rows,
        "backlog": backlog,
        "finished": finished,
        "fleet": console.nodes.fleet,
        "breaker": breaker.state.value,
        "broker_url": mask_url(settings.effective_broker_url),
        "database_url": mask_url(settings.sync_database_url),
        "chart": line_chart(
            "jobs finished per minute, last hour",
            sorted(series.items()),
            x_label="minutes ago",
            y_label="jobs / min",
            log_x=False,
        ),
        "wait_chart": line_chart(
            "queue wait (queued to started) per minute, last hour",
            [(name, points) for name, points in waits.items() if points],
            x_label="minutes ago",
            y_label="seconds",
            log_x=False,
        ),
    }


# --- jobs ----------------------------------------------------------------------------------


@router.get("/jobs")
async def jobs_list(request: Request, operator: Reader) -> Response:
    q = request.query_params
    where = data.JobFilter(
        status=q.get("status") or None,
        task=q.get("task") or None,
        queue=q.get("queue") or None,
        owner=q.get("owner") or None,
        since=_time_param(q.get("since"), "since"),
        until=_time_param(q.get("until"), "until"),
    )
    after = None
    if q.get("after"):
        try:
            after = data.Cursor.decode(q["after"])
        except ValueError as e:
            raise Refused(400, f"after: {e}") from None
    found = await console_of(request).sql.read(lambda c: data.job_page(c, where, after=after))
    keep = {k: v for k, v in q.items() if k != "after" and v}
    next_url = None
    if found.next is not None:
        keep["after"] = found.next.encode()
        next_url = "/console/jobs?" + "&".join(f"{k}={quote(v)}" for k, v in keep.items())
    return await page(
        request,
        "jobs.html",
        operator,
        found=found,
        where=where,
        raw=dict(q),
        next_url=next_url,
        statuses=[s.value for s in JobStatus],
        queues=QUEUES,
    )


def _time_param(value: str | None, name: str) -> float | None:
    """Epoch seconds, or a time ago: ``-30m``, ``-2h``, ``-7d``."""
    if not value:
        return None
    try:
        if value.startswith("-") and value[-1] in _UNIT_S:
            return time.time() - float(value[1:-1]) * _UNIT_S[value[-1]]
        return float(value)
    except ValueError:
        raise Refused(400, f"{name}: epoch seconds or -30m / -2h / -7d, not {value!r}") from None


_UNIT_S = {"m": 60, "h": 3600, "d": 86400}


@router.get("/jobs/{job_id}")
async def job_page(request: Request, operator: Reader, job_id: str) -> Response:
    return await page(request, "job.html", operator, **await _job(request, job_id))


@router.get("/fragments/jobs/{job_id}")
async def job_fragment(request: Request, operator: Reader, job_id: str) -> Response:
    return await page(request, "_job_live.html", operator, **await _job(request, job_id))


async def _job(request: Request, job_id: str) -> dict[str, Any]:
    sql = console_of(request).sql
    job = await sql.read(lambda c: data.get_job(c, job_id))
    if job is None:
        raise Refused(404, f"no job {job_id!r}")
    return {
        "job": job,
        "attempts": await sql.read(lambda c: data.job_attempts(c, job_id)),
        "args_json": json.dumps({"args": job.args, "kwargs": job.kwargs}, indent=2, default=str),
        "result_json": json.dumps(job.result, indent=2, default=str),
    }


@router.post("/jobs/{job_id}/{action}")
async def job_action(request: Request, operator: Actor, job_id: str, action: str) -> Response:
    if action not in ("retry", "cancel"):
        raise Refused(404, f"no action {action!r}")
    return await _act(request, operator, action, [job_id], back=f"/console/jobs/{job_id}")


# --- dead letters --------------------------------------------------------------------------


@router.get("/dead")
async def dead(request: Request, operator: Reader) -> Response:
    groups = await console_of(request).sql.read(data.dead_groups)
    return await page(request, "dead.html", operator, groups=groups, done=request.query_params)


@router.post("/dead/{action}")
async def dead_action(request: Request, operator: Actor, action: str) -> Response:
    if action not in ("retry", "discard"):
        raise Refused(404, f"no action {action!r}")
    form = await request.form()
    ids = [str(i) for i in form.getlist("job_id")]
    if form.get("task") is not None:  # a whole group
        task, error = str(form.get("task")), str(form.get("error") or "")
        ids = await console_of(request).sql.read(lambda c: data.dead_ids(c, task=task, error=error))
    if not ids:
        raise Refused(400, "job_id: select at least one job")
    return await _act(request, operator, action, ids, back="/console/dead")


async def _act(
    request: Request, operator: Operator, action: str, ids: list[str], *, back: str
) -> Response:
    """Ask first (a page that posts the same form with ``confirm``), then do it and log it."""
    form = await request.form()
    if form.get("confirm") != "yes":
        fields = [(k, str(v)) for k, v in form.multi_items() if k not in (CSRF_FIELD, "confirm")]
        return await page(
            request, "confirm.html", operator, action=action, ids=ids, fields=fields, back=back
        )
    console = console_of(request)
    done, failed = await run_in_threadpool(_apply, console, action, ids)
    target = ids[0] if len(ids) == 1 else f"{len(ids)} jobs: {', '.join(ids[:5])}"
    detail = "; ".join(failed[:5])
    await console.sql.write(
        lambda c: data.log_action(
            c, actor=operator.name, action=f"job.{action}", target=target, count=done, detail=detail
        )
    )
    sep = "&" if "?" in back else "?"
    return RedirectResponse(f"{back}{sep}done={action}&count={done}&failed={len(failed)}", 303)


def _apply(console: ConsoleState, action: str, ids: list[str]) -> tuple[int, list[str]]:
    """(jobs changed, "<id>: why" for those that could not be)."""
    jobs = console.services.jobs
    if action == "discard":
        with jobs.engine.begin() as conn:
            return len(data.discard_dead(conn, ids)), []
    done, failed = 0, []
    for job_id in ids:
        try:
            jobs.retry(job_id) if action == "retry" else jobs.cancel(job_id)
            done += 1
        except TasklabError as e:
            failed.append(f"{job_id}: {e}")
    return done, failed


# --- queue controls ------------------------------------------------------------------------


@router.post("/queues/{queue}/{action}")
async def queue_action(request: Request, operator: Actor, queue: str, action: str) -> Response:
    if queue not in QUEUES or action not in ("pause", "resume"):
        raise Refused(404, f"no queue action {queue}/{action}")
    nodes = console_of(request).nodes
    call = nodes.pause if action == "pause" else nodes.resume
    return await _control(request, operator, f"queue.{action}", queue, lambda: call(queue))


@router.post("/nodes/{node}/{action}")
async def node_action(request: Request, operator: Actor, node: str, action: str) -> Response:
    if action not in ("grow", "shrink"):
        raise Refused(404, f"no node action {action!r}")
    nodes = console_of(request).nodes
    by = 1 if action == "grow" else -1
    return await _control(
        request, operator, f"pool.{action}", node, lambda: nodes.resize(node, by=by)
    )


async def _control(
    request: Request, operator: Operator, action: str, target: str, call: Any
) -> Response:
    form = await request.form()
    if form.get("confirm") != "yes":
        return await page(
            request,
            "confirm.html",
            operator,
            action=action,
            ids=[target],
            fields=[],
            back="/console",
        )
    answered = await run_in_threadpool(call)
    console = console_of(request)
    await console.sql.write(
        lambda c: data.log_action(
            c,
            actor=operator.name,
            action=action,
            target=target,
            count=len(answered),
            detail=", ".join(answered),
        )
    )
    return RedirectResponse(f"/console?done={action}&count={len(answered)}", status_code=303)


# --- the action log, the lab ----------------------------------------------------------------


@router.get("/actions")
async def action_log(request: Request, operator: Reader) -> Response:
    entries = await console_of(request).sql.read(data.recent_actions)
    return await page(request, "actions.html", operator, entries=entries)


@router.get("/lab")
async def lab(request: Request, operator: Reader) -> Response:
    runs = await run_in_threadpool(_lab_runs, console_of(request).results_dir)
    return await page(request, "lab.html", operator, runs=runs)


@router.get("/lab/compare")
async def lab_compare(request: Request, operator: Reader, old: str, new: str) -> Response:
    results_dir = console_of(request).results_dir
    before, after = _lab_result(results_dir, old), _lab_result(results_dir, new)
    return HTMLResponse(render_report([after], compare=before))


@router.get("/lab/runs/{name}")
async def lab_run(request: Request, operator: Reader, name: str) -> Response:
    return HTMLResponse(render_report([_lab_result(console_of(request).results_dir, name)]))


def _lab_runs(results_dir: Path) -> list[dict[str, Any]]:
    runs = []
    for path in sorted(results_dir.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            result = load_result(path)
        except TasklabError:
            continue  # not a lab result: not listed
        runs.append(
            {
                "name": path.name,
                "command": result.get("command", "?"),
                "started_at": float(result.get("started_at") or 0),
                "passed": result.get("passed"),
                "figures": len(result.get("figures") or {}),
            }
        )
    return runs


def _lab_result(results_dir: Path, name: str) -> dict[str, Any]:
    """Only a file listed in the results folder: a name is never a path."""
    path = results_dir / name
    if "/" in name or name.startswith(".") or not path.is_file():
        raise Refused(404, f"no lab result {name!r}")
    return load_result(path)
