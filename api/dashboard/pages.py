"""The web dashboard under ``/ui``: job list, submit form, job page with per-block curves, comparison.

Server-rendered (Jinja2) with htmx polling small fragments for live status, and uPlot for the
curves; both are vendored under ``api/dashboard/static/vendor`` (no CDN). Pages sign in with an API key kept in
a signed session cookie (``api.dashboard.session``) and call the same business functions as the
REST API (``api.dashboard.views``), so a tenant sees exactly what its key sees over HTTP.
"""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, FastAPI, Form, Header, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from api.dashboard import job_form, views
from api.dashboard.session import (
    BrowserSession,
    clear_session,
    csrf_matches,
    new_session,
    read_session,
    write_session,
)
from api.routes.deps import ReadSessionDep, SessionDep, SettingsDep, StorageDep, caller_for_key
from api.routes.submission import artifact_response, submit_job_request
from swq_shared import jobs
from swq_shared.auth import Caller, tenant_for_key
from swq_shared.errors import InvalidFieldError, QueueUnavailableError
from swq_shared.models import JobStatus

PREFIX = "/ui"
HERE = Path(__file__).parent
POLL_S = 2
# Everything is served from here: no inline script runs, nothing is fetched from elsewhere.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)

router = APIRouter(prefix=PREFIX, include_in_schema=False)
templates = Jinja2Templates(directory=HERE / "templates")


# --- template helpers ------------------------------------------------------------------------------


def _number(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:.{digits}g}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value else "—"


def _size(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)


templates.env.filters.update(number=_number, duration=_duration, when=_when, size=_size)
templates.env.globals.update(ui=PREFIX, poll_s=POLL_S, statuses=[s.value for s in JobStatus])


# --- who is asking ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Viewer:
    tenant: Caller
    browser: BrowserSession

    @property
    def csrf_token(self) -> str:
        return self.browser.csrf_token


def get_viewer(request: Request, session: ReadSessionDep) -> Viewer:
    """The signed-in tenant; anyone else goes to the login page and comes back afterwards."""
    browser = read_session(request)
    tenant = caller_for_key(request, session, browser.api_key) if browser else None
    if browser is None or tenant is None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        if request.headers.get("hx-request"):
            # A polled fragment: send the whole page, not the fragment, to the login form.
            target = request.headers.get("hx-current-url", f"{PREFIX}/jobs")
        raise views.LoginRequired(target)
    if request.app.state.rate_limiter is not None:  # the same per-key budget as the API's
        request.app.state.rate_limiter.check(browser.api_key)
    return Viewer(tenant, browser)


ViewerDep = Annotated[Viewer, Depends(get_viewer)]


def _check_csrf(viewer: Viewer, token: str | None) -> None:
    if not csrf_matches(viewer.browser, token):
        raise views.PageError(403, "This form has expired or did not come from this site. Reload the page and retry.")


def render(
    request: Request, name: str, context: dict[str, Any], viewer: Viewer | None = None, status_code: int = 200
) -> HTMLResponse:
    context = {"viewer": viewer, "csrf_token": viewer.csrf_token if viewer else "", **context}
    response = templates.TemplateResponse(request, name, context, status_code=status_code)
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Cache-Control"] = "no-store"
    return response


def _safe_next(target: str | None) -> str:
    """Only a path inside the dashboard: the login form must not redirect to another site."""
    if target and target.startswith(f"{PREFIX}/") and not target.startswith("//") and "\\" not in target:
        return target
    return f"{PREFIX}/jobs"


# --- signing in and out ----------------------------------------------------------------------------


@router.get("", response_class=RedirectResponse)
def home() -> RedirectResponse:
    return RedirectResponse(f"{PREFIX}/jobs", 303)


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: str | None = None) -> HTMLResponse:
    return render(request, "login.html", {"next": _safe_next(next), "error": None})


@router.post("/login", response_class=HTMLResponse)
def login(
    request: Request, session: SessionDep, api_key: Annotated[str, Form()] = "", next: Annotated[str, Form()] = ""
) -> Response:
    api_key = api_key.strip()
    tenant = tenant_for_key(session, api_key) if api_key else None
    if tenant is None:
        error = "This API key is not valid or has been revoked." if api_key else "Enter your API key."
        return render(request, "login.html", {"next": _safe_next(next), "error": error}, status_code=401)
    response = RedirectResponse(_safe_next(next), 303)
    write_session(request, response, new_session(api_key))
    return response


@router.post("/logout")
def logout(viewer: ViewerDep, csrf_token: Annotated[str, Form()] = "") -> RedirectResponse:
    _check_csrf(viewer, csrf_token)
    response = RedirectResponse(f"{PREFIX}/login", 303)
    clear_session(response)
    return response


# --- job list --------------------------------------------------------------------------------------


ListQuery = Annotated[str, Query(max_length=200)]


def list_context(
    session: ReadSessionDep,
    viewer: ViewerDep,
    status: ListQuery = "",
    label: ListQuery = "",
    sort: ListQuery = "created",
    ids: Annotated[list[str] | None, Query()] = None,
    cursor: Annotated[str | None, Query(max_length=400)] = None,
) -> dict[str, Any]:
    """The job list's filters and rows, shared by the page and its live-refreshed table fragment."""
    labels, label_error = views.parse_label_filter(label)
    status_error = views.parse_status_filter(status)
    sort = sort if sort in views.SORTS else "created"
    rows, next_cursor = (
        ([], None)
        if label_error or status_error
        else views.list_job_rows(session, viewer.tenant, status, labels, sort, cursor)
    )
    query = {"status": status, "label": label, "sort": sort}
    return {
        "rows": rows,
        "filters": query,
        "label_error": label_error,
        "status_error": status_error,
        "sorts": views.SORTS,
        "selected": set(ids or []),
        "cursor": cursor,
        "next_url": f"{PREFIX}/jobs?{urlencode({**query, 'cursor': next_cursor})}" if next_cursor else None,
        "live": any(not r.terminal for r in rows) or cursor is None,
    }


ListContext = Annotated[dict[str, Any], Depends(list_context)]


@router.get("/jobs", response_class=HTMLResponse)
def job_list(request: Request, viewer: ViewerDep, context: ListContext) -> HTMLResponse:
    return render(request, "jobs.html", context, viewer)


@router.get("/jobs/table", response_class=HTMLResponse)
def job_table(request: Request, viewer: ViewerDep, context: ListContext) -> HTMLResponse:
    return render(request, "_jobs_table.html", context, viewer)


# --- submitting ------------------------------------------------------------------------------------


def _submit_context(values: dict[str, Any], errors: dict[str, str]) -> dict[str, Any]:
    return {
        "values": values,
        "errors": errors,
        "sections": job_form.sections(),
        "idempotency_key": f"ui-{secrets.token_urlsafe(16)}",
    }


@router.get("/jobs/new", response_class=HTMLResponse)
def submit_page(
    request: Request,
    session: ReadSessionDep,
    viewer: ViewerDep,
    from_job: Annotated[str | None, Query(alias="from")] = None,
) -> HTMLResponse:
    """The form with JobRequest's defaults, or with another job's settings (``?from=<job id>``)."""
    values = job_form.defaults()
    if from_job:
        values = job_form.values_of(views.owned_job(session, viewer.tenant, from_job).spec)
    return render(request, "submit.html", _submit_context(values, {}), viewer)


@router.post("/jobs/new", response_class=HTMLResponse)
async def submit(request: Request, session: SessionDep, viewer: ViewerDep) -> Response:
    form = await request.form()
    _check_csrf(viewer, str(form.get("csrf_token", "")))
    values = job_form.values_from(form)
    spec, errors = job_form.request_from(values)
    status_code = 422
    if spec is not None:
        key = str(form.get("idempotency_key", ""))[:200] or None
        try:
            job, _ = submit_job_request(request.app.state.celery, session, viewer.tenant, spec, key)
            return RedirectResponse(f"{PREFIX}/jobs/{job.id}", 303)
        except InvalidFieldError as exc:  # beside the form field it names (loc: body, then the field path)
            errors = {".".join(exc.loc[1:]): str(exc)}
        except QueueUnavailableError as exc:
            errors, status_code = {"": str(exc)}, 503
    return render(request, "submit.html", _submit_context(values, errors), viewer, status_code)


# --- one job ---------------------------------------------------------------------------------------


def _job_context(session: SessionDep, viewer: Viewer, job_id: str) -> dict[str, Any]:
    job = views.owned_job(session, viewer.tenant, job_id)
    events = views.job_events(session, job.id)
    blocks = views.block_records(events)
    row = views.job_row(job)
    return {
        "job": job,
        "row": row,
        "blocks": blocks,
        "events": [{**e, "summary": views.event_summary(e)} for e in events],
        "charts": views.job_charts(blocks),
        "tuning": views.tuning_chart(tuning) if (tuning := views.tuning_steps(events)) else None,
        "metrics": sorted((m.name, m.value) for m in job.metrics),
        "artifacts": sorted(job.artifacts, key=lambda a: a.name),
        "spec_json": json.dumps(job.spec, indent=2),
        "cancellable": not row.terminal and not job.cancel_requested,
    }


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(
    request: Request, session: ReadSessionDep, viewer: ViewerDep, job_id: str, notice: str | None = None
) -> HTMLResponse:
    context = {**_job_context(session, viewer, job_id), "notice": views.NOTICES.get(notice or "")}
    return render(request, "job.html", context, viewer)


@router.get("/jobs/{job_id}/live", response_class=HTMLResponse)
def job_live(request: Request, session: ReadSessionDep, viewer: ViewerDep, job_id: str) -> HTMLResponse:
    return render(request, "_job_live.html", _job_context(session, viewer, job_id), viewer)


@router.post("/jobs/{job_id}/cancel")
def cancel(
    session: SessionDep, viewer: ViewerDep, job_id: str, csrf_token: Annotated[str, Form()] = ""
) -> RedirectResponse:
    _check_csrf(viewer, csrf_token)
    job = views.owned_job(session, viewer.tenant, job_id)
    try:
        jobs.request_cancel(session, job)
        notice = "cancel-requested"
    except jobs.JobStateError:
        notice = "already-finished"
    return RedirectResponse(f"{PREFIX}/jobs/{quote(job.id)}?notice={notice}", 303)


@router.get("/jobs/{job_id}/artifacts/{name}")
def artifact(
    session: ReadSessionDep,
    viewer: ViewerDep,
    settings: SettingsDep,
    storage: StorageDep,
    job_id: str,
    name: str,
    range_header: Annotated[str | None, Header(alias="Range")] = None,
) -> Any:
    """The REST download (ownership, Range, presigned redirect), signed in by cookie instead of header."""
    return artifact_response(session, viewer.tenant, settings, storage, job_id, name, range_header)


# --- comparing -------------------------------------------------------------------------------------


@router.get("/compare", response_class=HTMLResponse)
def compare(
    request: Request,
    session: ReadSessionDep,
    viewer: ViewerDep,
    ids: Annotated[list[str] | None, Query(max_length=12)] = None,
    only_differences: bool = False,
) -> HTMLResponse:
    unique = list(dict.fromkeys(ids or []))
    if len(unique) < 2:
        raise views.PageError(400, "Select at least two jobs to compare (tick them in the job list).")
    owned = [views.owned_job(session, viewer.tenant, job_id) for job_id in unique]
    rows = [views.job_row(job) for job in owned]
    diff = views.spec_diff([job.spec for job in owned])
    labels = views.run_labels(rows, diff)
    blocks = [views.block_records(views.job_events(session, job.id)) for job in owned]
    context = {
        "runs": list(zip(rows, labels, strict=True)),
        "rows": rows,
        "ppl": views.ppl_table(rows),
        "accuracy": views.accuracy_table(rows),
        "charts": views.compare_charts(blocks, labels),
        "diff": [d for d in diff if d["differs"]] if only_differences else diff,
        "only_differences": only_differences,
        "ids_query": urlencode([("ids", i) for i in unique]),
    }
    return render(request, "compare.html", context, viewer)


# --- wiring ----------------------------------------------------------------------------------------


def _login_required(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, views.LoginRequired)
    location = f"{PREFIX}/login?{urlencode({'next': _safe_next(exc.next_url)})}"
    if request.headers.get("hx-request"):
        return Response(status_code=401, headers={"HX-Redirect": location})
    return RedirectResponse(location, 303)


def _page_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, views.PageError)
    browser = read_session(request)
    return render(
        request,
        "error.html",
        {"status_code": exc.status_code, "message": exc.message, "signed_in": browser is not None},
        status_code=exc.status_code,
    )


def mount_static(app: FastAPI) -> None:
    app.mount(f"{PREFIX}/static", StaticFiles(directory=HERE / "static"), name="dashboard-static")


def install_dashboard(app: FastAPI) -> None:
    """Pages, static files and the two dashboard-only exception handlers (login redirect, error page)."""
    app.include_router(router)
    mount_static(app)
    app.add_exception_handler(views.LoginRequired, _login_required)
    app.add_exception_handler(views.PageError, _page_error)
