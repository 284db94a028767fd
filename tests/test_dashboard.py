"""The dashboard in a real browser: Chromium driven by Playwright against ``swquant serve`` with real jobs.

Two runs on the tiny Llama (OmniQuant, one epoch): one with the ``mse_sw`` loss sent over REST and one
with ``mse`` submitted through the form, so the list, the job page and the comparison show real
per-block records. Set ``SWQUANT_SCREENSHOTS=DIR`` to keep a PNG of every page the tests visit.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.commands.client import SWQuantClient
from tests.service_stack import Stack, embedded_stack

sync_api = pytest.importorskip("playwright.sync_api", reason="the dashboard tests need Playwright for Python")

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(f"the dashboard tests need Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
JOB_TIMEOUT_MS = 180_000
SCREENSHOTS = os.environ.get("SWQUANT_SCREENSHOTS")
RUN = {
    "bits": 3,
    "group_size": 32,
    "method": "omniquant",
    "method_options": {"epochs": 1, "batch_size": 4},
    "calibration": {"n_samples": 4, "seq_len": 32},
    "evaluation": {"max_windows": 2},
}


def _screenshot(page: sync_api.Page, name: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SCREENSHOTS) / f"{name}.png"), full_page=True)


def _console_errors(page: sync_api.Page) -> list[str]:
    """Errors the page logs from now on (a script failure, a resource the CSP blocked)."""
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    return errors


def _sign_in(page: sync_api.Page, url: str, key: str) -> None:
    page.goto(f"{url}/ui/login")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{url}/ui/jobs")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dashboard")


@pytest.fixture(scope="module")
def stack(workdir: Path) -> Iterator[Stack]:
    with embedded_stack(workdir) as stack:
        yield stack


@pytest.fixture(scope="module")
def browser() -> Iterator[sync_api.Browser]:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def signed_in(browser: sync_api.Browser, stack: Stack) -> Iterator[sync_api.BrowserContext]:
    context = browser.new_context(viewport={"width": 1366, "height": 900})
    page = context.new_page()
    _sign_in(page, stack.url, stack.api_key)
    page.close()
    yield context
    context.close()


@pytest.fixture
def page(signed_in: sync_api.BrowserContext) -> Iterator[sync_api.Page]:
    page = signed_in.new_page()
    yield page
    page.close()


@pytest.fixture(scope="module")
def sw_job(stack: Stack, tiny_llama_dir: Path) -> str:
    """The mse_sw run, sent over REST first so that it is ahead of the form's run in the queue."""
    spec = {**RUN, "model": str(tiny_llama_dir), "loss": "mse_sw", "loss_options": {"sw_num_projections": 8}}
    spec |= {"rotation": "hadamard", "finetune": {"epochs": 1, "loss": "kd_sw"}}  # a recipe beyond the method
    return SWQuantClient(stack.url, stack.api_key).submit(spec)["id"]


@pytest.fixture(scope="module")
def form_job(signed_in: sync_api.BrowserContext, stack: Stack, tiny_llama_dir: Path, sw_job: str) -> str:
    """The mse run, submitted through the form; its id is where the form redirects to."""
    page = signed_in.new_page()
    page.goto(f"{stack.url}/ui/jobs/new")
    page.get_by_label("Model", exact=True).fill(str(tiny_llama_dir))
    page.get_by_label("Bits", exact=True).fill(str(RUN["bits"]))
    page.get_by_label("Group size", exact=True).fill(str(RUN["group_size"]))
    page.get_by_label("Method", exact=True).select_option("omniquant")
    page.get_by_label("Method options (JSON)").fill(json.dumps(RUN["method_options"]))
    page.get_by_label("Loss", exact=True).select_option("mse")
    page.locator("#calibration-n_samples").fill("4")
    page.locator("#calibration-seq_len").fill("32")
    page.get_by_label("Max windows").fill("2")
    page.get_by_label("Metadata (JSON)").fill('{"suite": "dashboard"}')
    page.get_by_role("button", name="Submit job").click()
    page.wait_for_url(re.compile(r".*/ui/jobs/[0-9a-f]{32}$"))
    job_id = page.url.rsplit("/", 1)[-1]
    page.close()
    return job_id


def _wait_succeeded(page: sync_api.Page, stack: Stack, job_id: str) -> None:
    page.goto(f"{stack.url}/ui/jobs/{job_id}")
    status = page.locator("#job-status")
    status.filter(has_text=re.compile("succeeded|failed|cancelled")).wait_for(timeout=JOB_TIMEOUT_MS)
    assert status.inner_text() == "succeeded", stack.log_tail()


def test_the_login_page_refuses_a_wrong_key(browser: sync_api.Browser, stack: Stack) -> None:
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{stack.url}/ui/jobs")
    assert "/ui/login" in page.url
    page.get_by_label("API key").fill("swq_not-a-key")
    page.get_by_role("button", name="Sign in").click()
    sync_api.expect(page.locator("#api_key-error")).to_contain_text("not valid")
    assert page.get_by_label("API key").get_attribute("aria-invalid") == "true"
    context.close()


def test_a_submitted_job_appears_in_the_list_and_its_status_updates_live(
    page: sync_api.Page, stack: Stack, form_job: str
) -> None:
    page.goto(f"{stack.url}/ui/jobs")
    row = page.locator(f"#job-{form_job}")
    assert row.locator(".status").inner_text() in ("queued", "running")  # the mse_sw run is ahead of it
    assert "omniquant" in row.inner_text() and "suite=dashboard" in row.inner_text()
    # No reload: the table fragment is polled.
    sync_api.expect(row.locator(".status")).to_have_text("succeeded", timeout=JOB_TIMEOUT_MS)
    sync_api.expect(row.locator("td").nth(8)).to_have_text(re.compile(r"^\d+(\.\d+)?$"))  # perplexity after
    _screenshot(page, "jobs-list")


def test_the_list_filters_by_metadata(page: sync_api.Page, stack: Stack, form_job: str, sw_job: str) -> None:
    page.goto(f"{stack.url}/ui/jobs")
    page.get_by_label("Metadata").fill("suite=dashboard")
    page.get_by_role("button", name="Apply").click()
    sync_api.expect(page.locator(f"#job-{form_job}")).to_be_visible()
    sync_api.expect(page.locator(f"#job-{sw_job}")).to_have_count(0)


def test_the_job_page_draws_the_per_block_loss_curve(page: sync_api.Page, stack: Stack, form_job: str) -> None:
    errors = _console_errors(page)
    _wait_succeeded(page, stack, form_job)
    chart = page.locator("#chart-loss")
    sync_api.expect(chart).to_have_attribute("data-points", "2")
    sync_api.expect(chart.locator("canvas")).to_be_visible()
    after = page.evaluate("window.swqPlots.get('chart-loss').data[1].filter((v) => v != null).length")
    assert after == 2  # one point per block of the 2-layer model
    painted = page.evaluate(
        """() => {
            const canvas = document.querySelector('#chart-loss canvas');
            const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
            let n = 0;
            for (let i = 3; i < pixels.length; i += 4) if (pixels[i] > 0) n++;
            return n;
        }"""
    )
    assert painted > 500
    assert page.locator("#blocks-table tbody tr").count() == 2
    sync_api.expect(page.locator("#chart-loss .u-legend")).to_contain_text("after calibration")
    assert errors == []
    _screenshot(page, "job-page")


def test_artifacts_download_with_the_session_cookie(page: sync_api.Page, stack: Stack, form_job: str) -> None:
    _wait_succeeded(page, stack, form_job)
    href = page.get_by_role("link", name="report.json").get_attribute("href")
    response = page.request.get(f"{stack.url}{href}")
    assert response.status == 200
    assert response.json()["spec"]["method"] == "omniquant"


def test_an_invalid_spec_is_shown_next_to_its_field(page: sync_api.Page, stack: Stack, tiny_llama_dir: Path) -> None:
    page.goto(f"{stack.url}/ui/jobs/new")
    page.get_by_label("Model", exact=True).fill(str(tiny_llama_dir))
    page.get_by_label("Bits", exact=True).fill("1")
    page.get_by_role("button", name="Submit job").click()
    sync_api.expect(page.locator("#bits-error")).to_contain_text("greater than or equal to 2")
    assert page.get_by_label("Bits", exact=True).get_attribute("aria-invalid") == "true"
    assert page.get_by_label("Model", exact=True).input_value() == str(tiny_llama_dir)  # what was typed is kept
    _screenshot(page, "submit-form-error")

    page.get_by_label("Bits", exact=True).fill("3")
    page.get_by_label("Loss", exact=True).select_option("mse_sw")
    page.get_by_label("Loss options (JSON)").fill('{"sw_block_size": 5}')
    page.locator("#calibration-seq_len").fill("32")
    page.get_by_role("button", name="Submit job").click()
    sync_api.expect(page.locator("#loss_options-error")).to_contain_text("divisible by sw_block_size")
    sync_api.expect(page.locator("#bits-error")).to_have_count(0)


def test_compare_overlays_the_curves_of_two_runs(page: sync_api.Page, stack: Stack, form_job: str, sw_job: str) -> None:
    _wait_succeeded(page, stack, sw_job)
    _wait_succeeded(page, stack, form_job)
    page.goto(f"{stack.url}/ui/jobs")
    errors = _console_errors(page)
    page.get_by_label(f"Select job {form_job[:8]} to compare").check()
    page.get_by_label(f"Select job {sw_job[:8]} to compare").check()
    page.get_by_role("button", name="Compare selected").click()
    page.wait_for_url(re.compile(r".*/ui/compare\?.*"))
    legend = page.locator("#chart-compare-mse .u-legend")
    sync_api.expect(legend).to_contain_text(f"{form_job[:8]} loss=mse")
    sync_api.expect(legend).to_contain_text(f"{sw_job[:8]} loss=mse_sw")
    series = page.evaluate("window.swqPlots.get('chart-compare-mse').data.slice(1, 3).map((s) => s.length)")
    assert series == [2, 2]
    differing = page.locator("table.diff tr.differs th").all_inner_texts()
    assert "loss" in differing and "bits" not in differing
    sync_api.expect(page.get_by_role("columnheader", name="gap")).to_have_count(1)  # the second run's
    assert errors == []
    _screenshot(page, "compare")


def test_cancel_needs_the_form_token_and_cancels_a_queued_job(
    page: sync_api.Page, stack: Stack, tiny_llama_dir: Path
) -> None:
    # No worker listens on the cpu queue of the embedded server: the job stays queued.
    client = SWQuantClient(stack.url, stack.api_key)
    spec = {**RUN, "model": str(tiny_llama_dir), "method": "rtn", "method_options": {}, "queue": "cpu"}
    job_id = client.submit(spec)["id"]
    forged = page.request.post(f"{stack.url}/ui/jobs/{job_id}/cancel", form={"csrf_token": "forged"})
    assert forged.status == 403
    assert client.job(job_id)["status"] == "queued"
    page.goto(f"{stack.url}/ui/jobs/{job_id}")
    page.get_by_role("button", name="Cancel job").click()
    sync_api.expect(page.locator("#job-status")).to_have_text("cancelled")
    assert client.job(job_id)["status"] == "cancelled"


def test_another_tenant_sees_none_of_the_jobs(
    browser: sync_api.Browser, stack: Stack, workdir: Path, form_job: str
) -> None:
    from swq_shared.auth import create_api_key
    from swq_shared.db import session_scope

    with session_scope(f"sqlite:///{workdir / 'data' / 'swquant.db'}") as session:
        other_key = create_api_key(session, "other-team")
    context = browser.new_context()
    page = context.new_page()
    _sign_in(page, stack.url, other_key)
    sync_api.expect(page.locator("table.jobs tbody")).to_contain_text("No jobs yet")
    for path in (f"/ui/jobs/{form_job}", f"/ui/jobs/{form_job}/live", f"/ui/jobs/{form_job}/artifacts/report.json"):
        assert page.request.get(f"{stack.url}{path}").status == 404, path
    response = page.goto(f"{stack.url}/ui/compare?ids={form_job}&ids={form_job[::-1]}")
    assert response is not None and response.status == 404
    context.close()


def test_a_tampered_session_cookie_is_refused(browser: sync_api.Browser, stack: Stack) -> None:
    context = browser.new_context()
    page = context.new_page()
    _sign_in(page, stack.url, stack.api_key)
    (cookie,) = [c for c in context.cookies() if c["name"] == "swq_session"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"
    payload, signature = cookie["value"].rsplit(".", 1)
    context.add_cookies([{**cookie, "value": f"{payload}x.{signature}"}])
    page.goto(f"{stack.url}/ui/jobs")
    assert "/ui/login" in page.url
    context.close()


def test_signing_out_ends_the_session(browser: sync_api.Browser, stack: Stack) -> None:
    context = browser.new_context()
    page = context.new_page()
    _sign_in(page, stack.url, stack.api_key)
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url(re.compile(r".*/ui/login$"))
    page.goto(f"{stack.url}/ui/jobs")
    assert "/ui/login" in page.url
    context.close()


def test_the_job_page_and_the_list_tell_the_whole_recipe(page: sync_api.Page, stack: Stack, sw_job: str) -> None:
    page.goto(f"{stack.url}/ui/jobs/{sw_job}")
    recipe = page.locator("#job-recipe").inner_text()
    assert recipe == (
        "rotation hadamard · W3 g32 · omniquant (epochs=1, batch_size=4) · loss mse_sw · tuning 1 epoch, loss kd_sw"
    )
    page.goto(f"{stack.url}/ui/jobs")
    method = page.locator(f"#job-{sw_job} td", has_text="omniquant")
    sync_api.expect(method).to_contain_text("omniquant + rotation hadamard + tuning 1 epoch, loss kd_sw")


def test_the_job_page_draws_the_tuning_loss_by_step(page: sync_api.Page, stack: Stack, sw_job: str) -> None:
    """The sw_job tunes end to end after its blocks: one point per step, as many as its tuning events."""
    errors = _console_errors(page)
    _wait_succeeded(page, stack, sw_job)
    chart = page.locator("#chart-tuning")
    sync_api.expect(chart.locator("canvas")).to_be_visible()
    points = page.evaluate("window.swqPlots.get('chart-tuning').data[1].filter((v) => v != null).length")
    events = SWQuantClient(stack.url, stack.api_key).events(sw_job, limit=1000)["items"]
    steps = [e for e in events if e["kind"] == "tuning"]
    assert points == len(steps) == steps[-1]["data"]["steps"] > 0
    sync_api.expect(chart.locator(".u-legend")).to_contain_text("tuning loss")
    assert errors == []


@pytest.fixture(scope="module")
def budget_job(stack: Stack, tiny_llama_dir: Path, sw_job: str) -> str:
    """A size budget's run (GPTQ over 2, 3 and 4 bits), queued behind the others."""
    budget = {"bits_per_weight": 3.2, "widths": [2, 3, 4], "group_sizes": [16, 32], "samples": 2}
    spec = {**RUN, "model": str(tiny_llama_dir), "method": "gptq", "method_options": {}, "budget": budget}
    return SWQuantClient(stack.url, stack.api_key).submit(spec)["id"]


def test_the_job_page_draws_a_size_budgets_bits_by_block(page: sync_api.Page, stack: Stack, budget_job: str) -> None:
    """One bar per block at the bits per weight its allocation stores, the schemes in the blocks table."""
    errors = _console_errors(page)
    _wait_succeeded(page, stack, budget_job)
    assert page.locator("#job-recipe").inner_text().startswith("budget 3.2 bits per weight over W2/3/4 · gptq")
    chart = page.locator("#chart-bits")
    sync_api.expect(chart.locator("canvas")).to_be_visible()
    drawn = page.evaluate("window.swqPlots.get('chart-bits').data[1]")
    events = SWQuantClient(stack.url, stack.api_key).events(budget_job, limit=1000)["items"]
    blocks = sorted((e["data"] for e in events if e["kind"] == "block"), key=lambda block: block["index"])
    assert drawn == pytest.approx([block["bits_per_weight"] for block in blocks])
    assert all(block["schemes"] for block in blocks)
    sync_api.expect(page.locator("#blocks-table")).to_contain_text("self_attn.q_proj W")
    _screenshot(page, "job-budget")
    assert errors == []
