"""A real browser against the live server (gunicorn + gevent, CSRF on): an admin adds a
channel in the console, tests it, prices its model and creates codes; a member redeems one."""
import os
import re

import pytest
from playwright.sync_api import expect

from extensions import db
from models import Channel, ModelPrice, RedemptionCode, User
from tests.support import ARTIFACTS, headless_chromium

ADMIN = "boss@example.com"
MEMBER = "member@example.com"
PASSWORD = "password123"  # tests.support.make_user's default
UPSTREAM_KEY = "sk-fake-upstream-key-123456789"


@pytest.fixture
def browser():
    """Headless Debian chromium; each test opens its own contexts (one per person)."""
    with headless_chromium() as browser:
        yield browser


def new_page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(10_000)
    return page


def shot(page, name):
    page.screenshot(path=os.path.join(ARTIFACTS, f"admin-{name}.png"), full_page=True)


def log_in(page, live, email):
    page.goto(live.url + "/login")
    page.fill("#email", email)
    page.fill("#password", PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_url(live.url + "/")


def test_admin_runs_the_gateway_from_the_console_and_a_member_redeems(live, browser):
    live.user(ADMIN, is_admin=True)
    live.user(MEMBER)
    page = new_page(browser)
    log_in(page, live, ADMIN)

    page.click("nav.nav a:has-text('Admin')")
    page.wait_for_url(live.url + "/admin")
    shot(page, "1-index")

    # Add a channel that points at the fake upstream, with a typo first.
    page.click(".tabs a:has-text('Channels')")
    expect(page.locator(".empty")).to_contain_text("No channels yet")
    page.click("a:has-text('Add channel')")
    page.fill("#name", "fake openai")
    page.select_option("#type", "openai")
    page.fill("#base_url", "localhost:1234")
    page.fill("#api_key", UPSTREAM_KEY)
    page.fill("#models", "gpt-4o-mini,fast=gpt-4o-mini")
    page.fill("#priority", "5")
    page.click("button:has-text('Add channel')")
    expect(page.locator(".field-error")).to_contain_text("Enter an http:// or https:// URL")
    shot(page, "2-channel-error")
    page.fill("#base_url", live.upstream.url)
    page.fill("#api_key", UPSTREAM_KEY)  # password fields are not refilled after an error
    page.click("button:has-text('Add channel')")
    page.wait_for_url(live.url + "/admin/channels")
    row = page.locator("tr[data-channel='fake openai']")
    expect(row.locator(".models")).to_contain_text("fast → gpt-4o-mini")
    expect(row.locator(".health")).to_contain_text("healthy")
    assert UPSTREAM_KEY not in page.content()

    # Test it: a real request through the adaptor to the fake upstream.
    row.locator("button:has-text('Test')").click()
    page.wait_for_url(live.url + "/admin/channels")
    expect(page.locator(".flash-ok")).to_contain_text(
        re.compile(r"Test of fake openai: OK, gpt-4o-mini answered in \d+ ms"))
    expect(page.locator("tr[data-channel='fake openai'] .last-test")).to_have_text(
        re.compile(r"\d+ ms"))
    shot(page, "3-channel-tested")
    pings = [e for e in live.upstream.events() if e["type"] == "request"]
    assert [(e["path"], e["auth"], e["body"]["model"], e["body"]["max_tokens"]) for e in pings] \
        == [("/v1/chat/completions", f"Bearer {UPSTREAM_KEY}", "gpt-4o-mini", 1)]

    # Price the served models: the unpriced list links straight to the form.
    page.click(".tabs a:has-text('Prices')")
    expect(page.locator("#unpriced")).to_contain_text("gpt-4o-mini")
    page.locator("#unpriced a[href$='model=gpt-4o-mini']").click()
    expect(page.locator("#model")).to_have_value("gpt-4o-mini")
    page.fill("#input", "0.1234567")
    page.fill("#output", "0.6")
    page.click("button:has-text('Save price')")
    expect(page.locator(".field-error")).to_contain_text("at most 6 decimal places")
    page.fill("#input", "0.15")
    page.click("button:has-text('Save price')")
    page.wait_for_url(live.url + "/admin/prices")
    expect(page.locator("tr[data-model='gpt-4o-mini']")).to_contain_text("0.15")
    expect(page.locator("#unpriced")).to_contain_text("fast")
    shot(page, "4-prices")

    # Create a batch of codes and read them off the copyable block.
    page.click(".tabs a:has-text('Codes')")
    page.fill("#amount", "5")
    page.fill("#count", "3")
    page.click("button:has-text('Generate')")
    codes = page.locator("#new-codes-list pre").inner_text().split()
    assert len(codes) == 3 and all(re.fullmatch(r"[0-9a-f]{32}", c) for c in codes)
    expect(page.locator("#codes tbody tr")).to_have_count(3)
    shot(page, "5-codes")

    for tab, name in (("Groups", "6-groups"), ("Users", "7-users"), ("Settings", "8-settings")):
        page.click(f".tabs a:has-text('{tab}')")
        shot(page, name)
        assert UPSTREAM_KEY not in page.content()
    page.click(".tabs a:has-text('Users')")
    page.click(f"a:has-text('{MEMBER}')")
    expect(page.locator("h1")).to_have_text(MEMBER)
    shot(page, "7b-user")

    # A member redeems one code on their wallet.
    member = new_page(browser)
    log_in(member, live, MEMBER)
    member.goto(live.url + "/wallet")
    member.fill("#code", codes[0])
    member.click("#code >> xpath=ancestor::form//input[@type='submit']")
    expect(member.locator("#stat-balance .stat-value")).to_have_text("5")
    shot(member, "9-member-redeemed")

    # The admin sees who redeemed it.
    page.goto(live.url + "/admin/codes?status=redeemed")
    expect(page.locator(f"tr[data-code='{codes[0]}']")).to_contain_text(f"by {MEMBER}")
    shot(page, "10-codes-redeemed")
    page.set_viewport_size({"width": 390, "height": 844})  # a phone: tables scroll sideways
    page.goto(live.url + "/admin/channels")
    shot(page, "11-channels-phone")

    def state():
        channel = db.session.scalar(db.select(Channel).filter_by(name="fake openai"))
        price = db.session.scalar(db.select(ModelPrice).filter_by(model="gpt-4o-mini"))
        member_row = db.session.scalar(db.select(User).filter_by(email=MEMBER))
        redeemed = db.session.scalar(db.select(RedemptionCode).filter_by(code=codes[0]))
        return (channel.api_key, channel.priority, channel.last_test_ms is not None,
                price.input_micro, price.output_micro, member_row.balance_micro,
                redeemed.redeemed_by_id == member_row.id)
    assert live.run(state) == (UPSTREAM_KEY, 5, True, 150_000, 600_000, 5_000_000, True)
