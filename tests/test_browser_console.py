"""A member, in a real browser against the live server: calls made through the openai SDK
show up in Logs (right tokens and credits), in the CSV export and on the Dashboard's Plotly
charts, and the Overview's Python snippet works when pasted with the key filled in."""
import csv
import os
import subprocess
import sys

import pytest
from openai import OpenAI
from playwright.sync_api import expect

from money import format_credits
from tests.support import ARTIFACTS, headless_chromium

EMAIL = "member@example.com"
PASSWORD = "password123"  # what LiveGateway.member gives its user


@pytest.fixture
def page():
    """A fresh headless Debian chromium page."""
    with headless_chromium() as browser:
        context = browser.new_context(viewport={"width": 1366, "height": 900},
                                      accept_downloads=True)
        page = context.new_page()
        page.set_default_timeout(15_000)
        yield page
        context.close()


def shot(page, name):
    page.screenshot(path=os.path.join(ARTIFACTS, f"console-{name}.png"), full_page=True)


def cell_texts(row):
    return [text.strip() for text in row.locator("td").all_inner_texts()]


def test_member_sees_sdk_calls_in_logs_csv_and_dashboard(live, page, tmp_path):
    key = live.member(EMAIL, credits=100)
    client = OpenAI(base_url=live.base_url, api_key=key, max_retries=0)
    client.chat.completions.create(model="gpt-4o-mini",
                                   messages=[{"role": "user", "content": "hello there"}])
    client.chat.completions.create(model="gpt-4o-mini", max_tokens=50,
                                   messages=[{"role": "user", "content": "tell me a story"}])
    chunks = list(client.chat.completions.create(
        model="gpt-4o-mini", stream=True,
        messages=[{"role": "user", "content": "count one two three"}]))
    assert chunks
    rows = live.wait_logs(3)
    assert len(rows) == 3 and all(r["status"] == "Success" for r in rows)
    assert all(r["credits_micro"] > 0 for r in rows)

    # Log in through the form (CSRF on).
    page.goto(live.url + "/logs")
    page.fill("#email", EMAIL)
    page.fill("#password", PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_url(live.url + "/logs")

    # Logs: every call, with its tokens and credits.
    for row in rows:
        tr = page.locator(f'tr[data-request-id="{row["request_id"]}"]')
        expect(tr).to_have_count(1)
        cells = cell_texts(tr)
        assert cells[1] == "gpt-4o-mini\ntest key"
        assert cells[2] == "Success"
        assert cells[3:5] == [f'{row["prompt_tokens"]:,} / {row["completion_tokens"]:,}',
                              format_credits(row["credits_micro"])]
        # The rest is in the row's details.
        tr.locator("[data-toggle-detail]").click()
        detail = page.locator(f'#log-detail-{row["id"]}')
        expect(detail).to_contain_text(row["request_id"])
        expect(detail).to_contain_text(
            f'{row["prompt_tokens"]:,} in ({row["cached_tokens"]:,} cached)')
        expect(detail).to_contain_text(row["endpoint"] + (" · stream" if row["is_stream"] else ""))
    shot(page, "logs")

    # CSV export of the same (filtered) view has the same rows.
    page.select_option("select[name=model]", "gpt-4o-mini")
    page.click(".filters button[type=submit]")
    page.wait_for_url("**/logs?**model=gpt-4o-mini**")
    with page.expect_download() as info:
        page.click("a:has-text('Export CSV')")
    path = tmp_path / "logs.csv"
    info.value.save_as(path)
    with open(path, newline="") as fh:
        exported = {r["request_id"]: r for r in csv.DictReader(fh)}
    assert set(exported) == {r["request_id"] for r in rows}
    for row in rows:
        line = exported[row["request_id"]]
        assert (line["prompt_tokens"], line["completion_tokens"], line["credits"], line["user"]) == (
            str(row["prompt_tokens"]), str(row["completion_tokens"]),
            format_credits(row["credits_micro"]), EMAIL)

    # Dashboard: Plotly charts drawn from our own static bundle, with the calls in them.
    page.click("nav.nav a:has-text('Dashboard')")
    page.click("nav[aria-label=Range] a:has-text('7 days')")
    page.wait_for_url("**/dashboard?days=7**")
    expect(page.locator(".js-plotly-plot")).to_have_count(5)
    traces = page.evaluate(
        "Array.from(document.querySelectorAll('.js-plotly-plot')).map(el => el.data.length)")
    assert all(count >= 1 for count in traces)
    requests_today = page.evaluate(
        "document.getElementById('chart-requests').data[0].y.slice(-1)[0]")
    assert requests_today == 3
    assert page.evaluate("document.querySelectorAll('#chart-requests .bars path').length") >= 1
    shot(page, "dashboard")

    # Overview: copy the Python snippet as shown, fill in the key, run it.
    page.click("nav.nav a:has-text('Overview')")
    page.wait_for_url(live.url + "/")
    expect(page.locator("#base-url")).to_have_text(live.base_url)
    shot(page, "overview")
    snippet = page.locator("#snippet-python pre").inner_text()
    assert live.base_url in snippet and "sk-your-key" in snippet
    script = tmp_path / "quickstart.py"
    script.write_text(snippet.replace("sk-your-key", key))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert len(live.wait_logs(5)) == 5  # the snippet's plain and streamed calls

    # The overview now counts today's requests and spend.
    page.reload()
    expect(page.locator("#stat-today-requests .stat-value")).to_have_text("5")
    spent = sum(r["credits_micro"] for r in live.logs())
    expect(page.locator("#stat-today-spend .stat-value")).to_have_text(format_credits(spent))
