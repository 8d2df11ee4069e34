"""The console a team lives in (issue 13) and its CSP (issue 10), in headless Chromium against
the live gunicorn server: a member from zero credits to a first call with the new key's own
snippet, an admin's first day, and every page at 1280 and 390 px in light and dark mode with no
horizontal overflow, no CSP violation, no serious axe finding, and a screenshot."""
import os
import re
import subprocess
import sys
from datetime import timedelta

import pytest
from axe_playwright_python.sync_playwright import Axe
from openai import OpenAI
from playwright.sync_api import expect

from tests.support import ARTIFACTS, headless_chromium, insert_logs

ADMIN = "boss@example.com"
MEMBER = "member@example.com"
PASSWORD = "password123"  # tests.support.make_user's default
UPSTREAM_KEY = "sk-upstream-SECRET-0123456789"
WIDE, PHONE = 1280, 390
# Collects CSP violations from the page itself (an init script is not subject to the CSP).
CSP_LISTENER = """
window.__csp = [];
document.addEventListener('securitypolicyviolation', function (e) {
  window.__csp.push(e.violatedDirective + ' ' + (e.blockedURI || 'inline'));
});
"""


@pytest.fixture(scope="module")
def browser():
    """One headless Debian chromium for the whole module."""
    with headless_chromium() as browser:
        yield browser


class Person:
    """One signed-in browser context (a viewport and a colour scheme), its page and what the
    page's console reported."""

    def __init__(self, browser, live, email, width=WIDE, scheme="light"):
        self.live = live
        self.context = browser.new_context(viewport={"width": width, "height": 860},
                                           color_scheme=scheme)
        self.context.add_init_script(CSP_LISTENER)
        self.page = self.context.new_page()
        self.page.set_default_timeout(10_000)
        self.console = []
        self.page.on("console", lambda msg: self.console.append((msg.type, msg.text)))
        self.page.on("pageerror", lambda err: self.console.append(("pageerror", str(err))))
        self.width, self.scheme = width, scheme
        if email:
            self.page.goto(live.url + "/login")
            self.page.fill("#email", email)
            self.page.fill("#password", PASSWORD)
            self.page.click("input[type=submit]")
            self.page.wait_for_url(live.url + "/")

    def go(self, path):
        # A generous bound: Plotly's 4.6 MB bundle on a loaded 2-core machine.
        response = self.page.goto(self.live.url + path, timeout=30_000)
        assert response.status < 400, (path, response.status)
        self.page.wait_for_load_state("load")
        return self.page

    def csp_problems(self):
        """CSP violations and script errors seen so far (console messages and events)."""
        seen = [text for kind, text in self.console
                if kind in ("error", "pageerror") and (
                    "Content Security Policy" in text or kind == "pageerror")]
        return seen + self.page.evaluate("window.__csp || []")

    def close(self):
        self.context.close()


def shot(page, name):
    page.screenshot(path=os.path.join(ARTIFACTS, f"ux-{name}.png"), full_page=True)


def page_width(page):
    return page.evaluate("document.documentElement.scrollWidth")


def serious_axe_violations(page):
    """axe-core findings of impact serious or critical, as 'rule: target' strings."""
    results = Axe().run(page, options={"resultTypes": ["violations"], "runOnly": {
        "type": "tag", "values": ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "wcag22aa"]}})
    return [f"{v['id']}: {[n['target'] for n in v['nodes']][:3]}"
            for v in results.response["violations"] if v["impact"] in ("serious", "critical")]


def in_view_horizontally(locator, width):
    box = locator.bounding_box()
    return box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width + 0.5


# --- a member: no credits, then a first call with the new key's own snippet ------------------

def test_member_from_zero_credits_to_a_logged_failure(live, browser, tmp_path):
    live.user(ADMIN, is_admin=True)
    live.user(MEMBER)  # no credits yet
    live.channel("fake", models="gpt-4o-mini,broken=fault-500")
    live.price("gpt-4o-mini")
    live.price("broken")

    phone = Person(browser, live, MEMBER, width=PHONE, scheme="dark")
    page = phone.page
    # The zero-credit banner says what to do, and who to ask, on the very first page.
    banner = page.locator("#no-credits-banner")
    expect(banner).to_be_visible()
    expect(banner).to_contain_text("402")
    expect(banner).to_contain_text("redeem a code on your Wallet")
    expect(banner).to_contain_text(ADMIN)
    assert page_width(page) <= PHONE
    shot(page, "member-zero-credits-390-dark")

    # Credits arrive: the banner goes.
    live.run(_grant, MEMBER, 50_000_000)
    phone.go("/keys")
    expect(page.locator("#no-credits-banner")).to_have_count(0)

    # Create a key on the phone: the primary action is on screen and works.
    new_key = page.locator(".page-head a.btn-primary", has_text="New key")
    assert in_view_horizontally(new_key, PHONE)
    new_key.click()
    page.fill("#name", "phone key")
    submit = page.locator("#create input[type=submit]")
    assert in_view_horizontally(submit, PHONE)
    submit.click()
    expect(page.locator("#new-key")).to_be_visible()
    assert page_width(page) <= PHONE
    shot(page, "member-new-key-390-dark")

    # The "Try it now" snippet runs exactly as shown, with the openai SDK, against this gateway.
    snippet = page.locator("#try-python pre").inner_text()
    assert live.base_url in snippet and "sk-your-key" not in snippet
    script = tmp_path / "try_tokenopen.py"
    script.write_text(snippet)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    key = re.search(r'api_key="(sk-[^"]+)"', snippet).group(1)
    # One call that fails upstream: its reason must be readable in the logs without hovering.
    client = OpenAI(base_url=live.base_url, api_key=key, max_retries=0)
    with pytest.raises(Exception):
        client.chat.completions.create(model="broken", messages=[{"role": "user", "content": "x"}])
    rows = live.wait_logs(2)
    failed = next(r for r in rows if r["status"] == "Failed")
    assert failed["error"]

    wide = Person(browser, live, MEMBER, width=WIDE)
    page = wide.go("/logs")
    row = page.locator(f'tr[data-request-id="{failed["request_id"]}"]')
    reason = row.locator(".error-text")
    expect(reason).to_be_visible()
    expect(reason).to_contain_text(failed["error"][:40])
    # Every column, the status included, fits in a 1280 px window.
    for header in page.locator("#logs thead th").all():
        assert in_view_horizontally(header, WIDE), header.inner_text()
    # Details: error, channel, tokens, cost, TTFT and a copyable request id.
    toggle = row.locator("[data-toggle-detail]")
    toggle.click()
    detail = page.locator(f'#{toggle.get_attribute("aria-controls")}')
    expect(detail).to_be_visible()
    for label in ("Error", "Channel", "Tokens", "Cost", "Time to first token", "Request ID"):
        expect(detail.locator("dt", has_text=label)).to_have_count(1)
    expect(detail).to_contain_text(failed["request_id"])
    copy = detail.locator("button.copy")
    assert failed["request_id"] in copy.get_attribute("aria-label")
    wide.context.grant_permissions(["clipboard-read", "clipboard-write"])
    copy.click()
    expect(page.locator("#live-status")).to_contain_text("Copied request ID")
    shot(page, "member-logs-detail-1280-light")

    # Logs on a phone: stacked rows, the reason still there, nothing sideways.
    page = phone.go("/logs")
    expect(page.locator(f'tr[data-request-id="{failed["request_id"]}"] .error-text')).to_be_visible()
    assert page_width(page) <= PHONE
    shot(page, "member-logs-390-dark")

    # The dashboard renders its charts under the CSP, in the dark theme's colours.
    page = phone.go("/dashboard?days=7")
    expect(page.locator(".js-plotly-plot")).to_have_count(5)
    axis_text = page.evaluate(
        "getComputedStyle(document.querySelector('#chart-requests .xtick text')).fill")
    assert axis_text not in ("rgb(68, 68, 68)", "#444")  # Plotly's default dark grey
    assert page_width(page) <= PHONE
    assert not phone.csp_problems() and not wide.csp_problems(), (
        phone.csp_problems(), wide.csp_problems())
    phone.close()
    wide.close()


def _grant(email, micro):
    from billing import grant_credits
    grant_credits(_user_id(email), micro, kind="grant", note="welcome")


def _user_id(email):
    from extensions import db
    from models import User
    return db.session.scalar(db.select(User.id).filter_by(email=email))


# --- an admin's first day -----------------------------------------------------------------

def test_admin_first_day_channel_test_codes_and_confirmations(live, browser):
    live.user(ADMIN, is_admin=True)
    live.user(MEMBER, credits=5)
    from blueprints.console import BOOTSTRAP_PASSWORD_SETTING

    def mark_bootstrap():
        from extensions import db
        from models import Setting, User
        admin = db.session.scalar(db.select(User).filter_by(email=ADMIN))
        Setting.put(BOOTSTRAP_PASSWORD_SETTING, admin.password_hash)
        db.session.commit()
    live.run(mark_bootstrap)

    admin = Person(browser, live, ADMIN, width=PHONE)
    page = admin.page
    expect(page.locator("#change-password-notice")).to_be_visible()
    page = admin.go("/admin")
    checklist = page.locator("#setup-checklist")
    expect(checklist).to_contain_text("1 of 4 done")  # a member exists: "invite" is done
    expect(checklist.locator("#step-invite")).to_have_class(re.compile("done"))
    expect(checklist.locator("#step-channel a")).to_be_visible()
    assert page_width(page) <= PHONE
    # Every admin tab is reachable on a phone: the tabs wrap instead of scrolling away.
    for tab in page.locator("nav.tabs a").all():
        assert in_view_horizontally(tab, PHONE), tab.inner_text()
    shot(page, "admin-checklist-390-light")

    # Add a channel with a mistake: the key the admin typed is kept, not silently dropped.
    checklist.locator("#step-channel a").click()
    page.fill("#name", "dead")
    page.fill("#base_url", "not a url")
    page.fill("#api_key", UPSTREAM_KEY)
    page.fill("#models", "gpt-4o-mini")
    page.click("button:has-text('Add channel')")
    expect(page.locator(".field-error")).to_contain_text("http://")
    expect(page.locator("#api_key")).to_have_value(UPSTREAM_KEY)
    expect(page.locator("#api-key-kept")).to_be_visible()
    # Without any key it is refused, never saved keyless by accident.
    page.fill("#api_key", "")
    page.fill("#base_url", "http://127.0.0.1:9")
    page.click("button:has-text('Add channel')")
    expect(page.locator(".field-error")).to_contain_text("API key")
    page.fill("#api_key", UPSTREAM_KEY)
    page.click("button:has-text('Add channel')")
    page.wait_for_url(live.url + "/admin/channels")

    # Test a channel nobody listens for: health turns red, the cause names the host, no key.
    row = page.locator("tr[data-channel='dead']")
    expect(row.locator(".health")).to_contain_text("healthy")
    expect(row.locator(".last-test")).to_contain_text("never")
    row.get_by_role("button", name="Test channel dead").click()
    row = page.locator("tr[data-channel='dead']")
    expect(row.locator(".health")).to_contain_text("test failed")
    expect(row.locator(".health")).not_to_contain_text("healthy")
    expect(row.locator(".health .last-error")).to_contain_text("127.0.0.1:9")
    expect(row.locator(".health .last-error")).to_contain_text("connection refused")
    expect(row.locator(".last-test")).to_contain_text("failed")
    assert UPSTREAM_KEY not in page.content()
    assert page_width(page) <= PHONE
    shot(page, "admin-channel-test-failed-390-light")

    # Point it at the real (fake) upstream and test again: healthy, with a time and latency.
    row.get_by_role("link", name="Edit channel dead").click()
    page.fill("#base_url", live.upstream.url)
    page.click("button:has-text('Save')")
    page.wait_for_url(live.url + "/admin/channels")
    page.get_by_role("button", name="Test channel dead").click()
    row = page.locator("tr[data-channel='dead']")
    expect(row.locator(".health")).to_contain_text("healthy")
    expect(row.locator(".last-test")).to_contain_text("passed")
    expect(row.locator(".last-test time")).to_have_count(1)

    # Revoke an unused code; the member can no longer redeem it.
    page = admin.go("/admin/codes")
    page.fill("#amount", "5")
    page.fill("#count", "2")
    page.click("#codes-form button[type=submit]")
    codes = page.locator("#new-codes-list pre").inner_text().split()
    assert len(codes) == 2
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name=f"Revoke code {codes[0]}").click()
    expect(page.locator(f"tr[data-code='{codes[0]}'] .status")).to_contain_text("revoked")
    expect(page.get_by_role("button", name=f"Revoke code {codes[1]}")).to_have_count(1)
    member = Person(browser, live, MEMBER)
    member.go("/wallet")
    member.page.fill("#code", codes[0])
    member.page.click("#redeem input[type=submit]")
    expect(member.page.locator(".field-error")).to_be_visible()
    assert live.run(lambda: _balance(MEMBER)) == 5_000_000

    # Account-level actions ask first; dismissing changes nothing.
    member_id = live.run(lambda: _user_id(MEMBER))
    asked = []

    def dismiss(dialog):
        asked.append(dialog.message)
        dialog.dismiss()
    page = admin.go(f"/admin/users/{member_id}")
    page.once("dialog", dismiss)
    page.get_by_role("button", name="Disable account").click()
    page.once("dialog", dismiss)
    page.get_by_role("button", name="Make admin").click()
    assert len(asked) == 2 and MEMBER in asked[0] and "admin" in asked[1]
    assert live.run(lambda: _flags(MEMBER)) == (False, False)
    assert not admin.csp_problems() and not member.csp_problems()
    admin.close()
    member.close()


def _balance(email):
    from extensions import db
    from models import User
    return db.session.scalar(db.select(User.balance_micro).filter_by(email=email))


def _flags(email):
    from extensions import db
    from models import User
    user = db.session.scalar(db.select(User).filter_by(email=email))
    return user.disabled, user.is_admin


# --- a team's dashboard and every page, both widths, both themes ---------------------------

def _team_history(live, keys=15):
    """A member with `keys` keys of history (free and priced models) and an admin."""
    from models import utcnow
    live.user(ADMIN, is_admin=True)
    member_id = live.user(MEMBER, credits=100)
    live.member("second@example.com", credits=1)
    now = utcnow()
    key_ids = [live.run(_make_key, MEMBER, f"key-{n:02d}") for n in range(keys)]
    rows = []
    for n in range(keys):
        for day in range(3):
            rows.append({"user_id": member_id, "key_name": f"key-{n:02d}", "key_id": key_ids[n],
                         "created_at": now - timedelta(days=day, minutes=n),
                         "prompt_tokens": 1_000_000 + n, "completion_tokens": 250_000,
                         "credits_micro": 1_234_567 * (n + 1) if n % 2 else 0,
                         "model": "gpt-4o" if n % 2 else "free-model"})
    rows.append({"user_id": member_id, "key_name": "key-00", "key_id": key_ids[0],
                 "status": "Failed", "http_status": 502,
                 "error": "Upstream said: model overloaded", "created_at": now})
    live.run(insert_logs, rows)
    return member_id


COMBOS = ((WIDE, "light"), (WIDE, "dark"), (PHONE, "light"), (PHONE, "dark"))
# axe runs once per page and theme (contrast differs by theme), at alternating widths.
AXE_COMBOS = {(WIDE, "light"), (PHONE, "dark")}
MEMBER_PAGES = ["/", "/keys", "/keys/{key_id}/edit", "/wallet", "/logs", "/dashboard", "/pricing",
                "/account/password"]
ADMIN_PAGES = ["/admin", "/admin/channels", "/admin/channels/new", "/admin/prices",
               "/admin/prices/set", "/admin/groups", "/admin/groups/new", "/admin/users",
               "/admin/users/{member_id}", "/admin/users/new", "/admin/codes", "/admin/settings",
               "/logs", "/dashboard?days=7"]


# One signed-in page per person, reused for every width and theme (set_viewport_size and
# emulate_media), so each logs in once and loads Plotly once; the work is split in three so
# the suite's two workers share it.
@pytest.mark.parametrize("people", [
    [("guest", ["/login", "/register"]), ("member", MEMBER_PAGES)],
    [("admin", ADMIN_PAGES[:7])],
    [("admin", ADMIN_PAGES[7:])],
], ids=["guest-member", "admin-1", "admin-2"])
def test_every_page_at_both_widths_and_themes(live, browser, people):
    member_id = _team_history(live)
    key_id = live.run(_make_key, MEMBER, "laptop")
    emails = {"guest": None, "member": MEMBER, "admin": ADMIN}
    problems, overflow, a11y = [], [], {}
    for role, paths in people:
        person = Person(browser, live, emails[role])
        for width, scheme in COMBOS:
            person.page.set_viewport_size({"width": width, "height": 860})
            person.page.emulate_media(color_scheme=scheme)
            for path in paths:
                path = path.format(key_id=key_id, member_id=member_id)
                page = person.go(path)
                if "/dashboard" in path:
                    expect(page.locator(".js-plotly-plot").first).to_be_visible()
                if page_width(page) > width:
                    overflow.append((path, width, page_width(page)))
                name = re.sub(r"[^a-z0-9]+", "-", f"{role}{path}").strip("-")
                shot(page, f"{name}-{width}-{scheme}")
                if (width, scheme) in AXE_COMBOS:
                    found = serious_axe_violations(page)
                    if found:
                        a11y[(path, width, scheme)] = found
        problems += person.csp_problems()
        person.close()
    assert not overflow, overflow
    assert not problems, problems
    assert not a11y, a11y


def _make_key(email, name):
    from extensions import db
    from models import ApiKey
    from tests.support import make_key
    make_key(email, name=name)
    return db.session.scalar(db.select(ApiKey.id).filter_by(name=name))


def test_team_dashboard_top_ten_switch_and_formatted_totals(live, browser):
    member_id = _team_history(live, keys=15)
    admin = Person(browser, live, ADMIN)
    page = admin.go("/dashboard?days=7")
    # By credits, only the keys that spent any (the free model's keys cost nothing).
    labels = page.evaluate("document.getElementById('chart-keys').data[0].y")
    assert len(labels) == 8 and not any(label.startswith("other") for label in labels)
    # Totals are formatted for people: thousands separators, two decimals for credits.
    tokens = page.locator("#total-tokens .stat-value").inner_text()
    assert re.fullmatch(r"[\d,]+ / [\d,]+", tokens) and "," in tokens
    credits = page.locator("#total-credits .stat-value").inner_text()
    assert re.fullmatch(r"[\d,]+(\.\d{1,2})?", credits), credits
    # Admins see a per-user chart, and can open one member's dashboard.
    expect(page.locator("#chart-users.js-plotly-plot")).to_have_count(1)
    # Switching to requests redraws the breakdowns: the free model has requests, no credits.
    before = page.evaluate("document.getElementById('chart-models').data[0].y")
    assert "free-model" not in before
    page.click("#metric-switch [data-metric=requests]")
    page.wait_for_function(
        "document.getElementById('chart-models').data[0].y.includes('free-model')")
    # 15 keys with requests: the ten largest and one "other", not 15 bars.
    labels = page.evaluate("document.getElementById('chart-keys').data[0].y")
    assert len(labels) == 11 and "other (5 more)" in labels
    # One colour per meaning: the failed series is the only red one, in both charts.
    colours = page.evaluate("""[document.getElementById('chart-requests').data[1].marker.color,
        document.getElementById('chart-tokens').data[1].marker.color]""")
    assert colours[0] != colours[1]
    page = admin.go(f"/dashboard?user={member_id}")
    expect(page.locator(".page-head")).to_contain_text(MEMBER)
    assert not admin.csp_problems(), admin.csp_problems()
    admin.close()
