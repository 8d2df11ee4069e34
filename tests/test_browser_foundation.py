"""A real browser against the live server (gunicorn + gevent, CSRF on): register, log in,
create a key, see it once, reload to see only its prefix, disable it."""
import os
import re

import pytest
from playwright.sync_api import expect

from extensions import db
from models import ApiKey, User
from tests.support import ARTIFACTS, headless_chromium

EMAIL = "browser@example.com"
PASSWORD = "correct-horse-42"


@pytest.fixture
def browser_page():
    """A fresh headless Debian chromium page (clipboard allowed, for the copy button)."""
    with headless_chromium() as browser:
        context = browser.new_context(viewport={"width": 1280, "height": 860})
        page = context.new_page()
        page.set_default_timeout(10_000)
        yield context, page
        context.close()


def shot(page, name):
    page.screenshot(path=os.path.join(ARTIFACTS, f"foundation-{name}.png"), full_page=True)


def _keys_of(email):
    user = db.session.scalar(db.select(User).filter_by(email=email))
    return [(k.key_hash, k.disabled, k.credit_limit_micro)
            for k in db.session.scalars(db.select(ApiKey).filter_by(user_id=user.id))]


def test_register_login_create_key_once_then_disable(live, browser_page):
    context, page = browser_page
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=live.url)

    # Register.
    page.goto(live.url + "/register")
    page.fill("#email", EMAIL)
    page.fill("#password", PASSWORD)
    page.fill("#confirm", PASSWORD)
    shot(page, "1-register")
    page.click("button[type=submit], input[type=submit]")
    page.wait_for_url(live.url + "/")
    expect(page.locator(".account-email")).to_have_text(EMAIL)
    shot(page, "2-registered")

    # Log out through the account menu, then log in again.
    page.click(".account-menu summary")
    page.click(".menu-panel button:has-text('Log out')")
    page.wait_for_url(re.compile(r"/login$"))
    expect(page.locator(".flash")).to_contain_text("You are logged out.")
    page.fill("#email", EMAIL)
    page.fill("#password", "not-my-password")
    page.click("input[type=submit]")
    expect(page.locator(".form-error")).to_have_text("Wrong email or password.")
    page.fill("#password", PASSWORD)
    shot(page, "3-login")
    page.click("input[type=submit]")
    page.wait_for_url(live.url + "/")

    # Create a key: the full key is on the page exactly once.
    page.click("nav.nav a:has-text('Keys')")
    page.wait_for_url(live.url + "/keys")
    expect(page.locator(".empty")).to_contain_text("no API keys yet")
    page.fill("#name", "browser key")
    page.fill("#credit_limit", "5")
    page.click("#create input[type=submit]")
    page.wait_for_selector("#new-key")
    # the POST's entry became a plain GET of /keys (app.js replaces it once the page runs)
    expect(page).to_have_url(live.url + "/keys")
    full_key = page.locator("#new-key-value").inner_text().strip()
    assert re.fullmatch(r"sk-[A-Za-z0-9]{48}", full_key)
    [(key_hash, disabled, limit)] = live.run(_keys_of, EMAIL)
    assert key_hash == ApiKey.hash_key(full_key) and not disabled and limit == 5_000_000
    copy = page.get_by_role("button", name="Copy the new key")
    copy.click()
    expect(copy).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == full_key
    shot(page, "4-key-created")

    # Reload: only the display prefix remains, and no second key was created.
    page.reload()
    assert page.locator("#new-key").count() == 0
    assert len(live.run(_keys_of, EMAIL)) == 1
    assert full_key not in page.content()
    row = page.locator("#keys-table tbody tr")
    expect(row).to_have_count(1)
    expect(row.locator(".key-display")).to_have_text(f"{full_key[:7]}…{full_key[-4:]}")
    expect(row.locator(".key-status")).to_have_text("enabled")
    shot(page, "5-reloaded")

    # Disable it.
    row.locator("button:has-text('Disable')").click()
    page.wait_for_url(live.url + "/keys")
    expect(page.locator("#keys-table tbody tr .key-status")).to_have_text("disabled")
    expect(page.locator(".flash")).to_contain_text("is disabled")
    assert live.run(_keys_of, EMAIL)[0][1] is True
    shot(page, "6-disabled")

    # The same page at phone width (for people reviewing the screenshots).
    page.set_viewport_size({"width": 390, "height": 844})
    page.reload()
    shot(page, "7-keys-phone")
