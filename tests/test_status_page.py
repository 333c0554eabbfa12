"""The status page (?view=status): off by default, its sign-in, session, CSRF, headers and escaping,
and the whole flow in a real headless Chromium."""

import os
import shutil
import sys

import pytest

import listener
from conftest import SECRET, Site, vbout_body, write_config

ADMIN = "admin-secret-0123456789abcdef"
XSS = "<script>document.title='pwned'</script>"


@pytest.fixture
def admin_site(tmp_path):
    site = Site(tmp_path, admin_secret=ADMIN)
    with open(site.config_path, "a") as f:
        f.write("[handlers]\nenabled = flaky\n[handler:flaky]\nmodule = command\ncommand = %s %s\n" % (
            sys.executable, tmp_path / "flaky.py"))
    (tmp_path / "flaky.py").write_text("import os, sys\nsys.exit(1 if os.path.exists(%r) else 0)\n"
                                       % str(tmp_path / "fail"))
    (tmp_path / "fail").write_text("")
    listener._config_cache.clear()
    site.post(vbout_body(1))
    site.post(b"transactionid=xss&contact[email]=x%40example.com&fields[0][name]=Note&fields[0][value]="
              + XSS.replace(" ", "+").encode())
    return site


def sign_in(site, key=ADMIN, status=303, **kw):
    return site.app.post("/listener.py?view=status", {"action": "signin", "admin_key": key}, status=status, **kw)


def test_status_page_is_off_without_admin_secret(site):
    page = site.app.get("/listener.py?view=status", status=404)
    assert "admin_secret" in page.text and page.content_type == "text/html"


def test_status_page_shows_a_sign_in_form_without_a_session(admin_site):
    page = admin_site.app.get("/listener.py?view=status", status=200)
    assert 'name="admin_key"' in page.text and 'method="post"' in page.text
    assert "Latest events" not in page.text


def test_admin_secret_must_differ_from_secret(tmp_path):
    path = write_config(tmp_path, admin_secret=SECRET)
    with pytest.raises(listener.ConfigError, match="admin_secret: \\(value hidden\\) is also in secret"):
        listener.load_config(path)


def test_sign_in_sets_a_strict_session_cookie(admin_site):
    answer = sign_in(admin_site)
    cookie = answer.headers["Set-Cookie"]
    assert cookie.startswith("vbout_admin=") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert "Secure" not in cookie and "Max-Age=28800" in cookie
    assert answer.headers["Location"] == "?view=status" and ADMIN not in answer.headers["Location"]
    page = admin_site.app.get("/listener.py?view=status", status=200)
    assert "Latest events" in page.text
    https = admin_site.app.post("/listener.py?view=status", {"action": "signin", "admin_key": ADMIN}, status=303,
                                extra_environ={"wsgi.url_scheme": "https", "REMOTE_ADDR": "198.51.100.8"})
    assert "Secure" in https.headers["Set-Cookie"]


def test_wrong_admin_key_is_refused_and_rate_limited(admin_site):
    for _ in range(5):
        assert "That admin key is wrong." in sign_in(admin_site, "wrong", status=403).text
    assert sign_in(admin_site, ADMIN, status=429).headers["Retry-After"] == "900"  # even the right key, for now
    sign_in(admin_site, ADMIN, extra_environ={"REMOTE_ADDR": "203.0.113.5"})  # another address is not blocked
    conn = listener.connect(admin_site.config)
    with listener.transaction(conn):
        conn.execute("UPDATE admin_attempts SET since = '2000-01-01T00:00:00Z'")
    sign_in(admin_site)  # the window has passed


def test_forged_or_expired_session_is_refused(admin_site):
    admin_site.app.set_cookie("vbout_admin", "9999999999.abcd.0123")
    assert 'name="admin_key"' in admin_site.app.get("/listener.py?view=status").text
    config = admin_site.config
    expired = "100.%s.%s" % ("ab" * 8, listener._sign(config, "100." + "ab" * 8))
    admin_site.app.set_cookie("vbout_admin", expired)
    assert 'name="admin_key"' in admin_site.app.get("/listener.py?view=status").text


def test_pages_set_strict_headers_and_escape_every_value(admin_site):
    sign_in(admin_site)
    for url in ("/listener.py?view=status", "/listener.py?view=status&event=2",
                "/listener.py?view=status&q=%3Cb%3E"):
        page = admin_site.app.get(url, status=200)
        assert page.headers["Content-Security-Policy"].startswith("default-src 'none'; style-src 'sha256-")
        assert page.headers["X-Frame-Options"] == "DENY" and page.headers["Cache-Control"] == "no-store"
        assert "<script" not in page.text.lower() and "<b>" not in page.text
        assert SECRET not in page.text and ADMIN not in page.text
    assert "&lt;script&gt;document.title=" in admin_site.app.get("/listener.py?view=status&event=2").text


def test_search_by_email_and_transaction(admin_site):
    sign_in(admin_site)
    page = admin_site.app.get("/listener.py?view=status&q=x%40example.com")
    assert "Events matching x@example.com" in page.text and "contact1@example.com" not in page.text
    assert "contact1@example.com" in admin_site.app.get("/listener.py?view=status&q=123456790").text


def test_retry_needs_the_csrf_token(admin_site):
    sign_in(admin_site)
    form = {"action": "retry", "event_id": "1", "handler": "flaky"}
    admin_site.app.post("/listener.py?view=status", dict(form, csrf="forged"), status=403)
    os.remove(os.path.join(admin_site.folder, "fail"))
    page = admin_site.app.get("/listener.py?view=status")
    csrf = page.text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    answer = admin_site.app.post("/listener.py?view=status", dict(form, csrf=csrf), status=303)
    assert answer.headers["Location"] == "?view=status&event=1"
    assert admin_site.rows("SELECT status FROM deliveries WHERE event_id = 1")[0]["status"] == "done"


def test_export_csv_needs_a_session(admin_site):
    assert "text/html" in admin_site.app.get("/listener.py?view=export").content_type
    sign_in(admin_site)
    export = admin_site.app.get("/listener.py?view=export")
    assert export.content_type == "text/csv" and "contact1@example.com" in export.text
    assert export.headers["Content-Disposition"] == 'attachment; filename="vbout-events.csv"'


def test_sign_out_needs_csrf_and_ends_the_session(admin_site):
    sign_in(admin_site)
    admin_site.app.post("/listener.py?view=status", {"action": "signout", "csrf": "x"}, status=403)
    page = admin_site.app.get("/listener.py?view=status")
    csrf = page.text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    out = admin_site.app.post("/listener.py?view=status", {"action": "signout", "csrf": csrf}, status=303)
    assert "Max-Age=0" in out.headers["Set-Cookie"]
    assert 'name="admin_key"' in admin_site.app.get("/listener.py?view=status").text


def test_ingest_key_does_not_open_the_status_page(admin_site):
    admin_site.app.post("/listener.py?view=status", {"action": "signin", "admin_key": SECRET}, status=403)


# --- In a real browser ------------------------------------------------------------------------

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
needs_chromium = pytest.mark.skipif((not CHROMIUM or not DRIVER) and not os.environ.get("CI"),
                                    reason="chromium and chromium-driver are not installed (tests/run.py installs"
                                           " them as root)")


@pytest.fixture
def browser():
    pytest.importorskip("selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@needs_chromium
def test_status_page_in_chromium(admin_site, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from test_cli import Server

    def wait_for(text):
        WebDriverWait(browser, 15).until(lambda driver: text in driver.page_source)

    server = Server(config=admin_site.config_path)
    try:
        page = server.url.split("?")[0] + "?view=status"
        browser.get(page)
        browser.find_element(By.NAME, "admin_key").send_keys(ADMIN)
        browser.find_element(By.TAG_NAME, "button").click()
        wait_for("Latest events")
        cookie = browser.get_cookie("vbout_admin")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert ADMIN not in browser.current_url

        search = browser.find_element(By.NAME, "q")
        search.send_keys("x@example.com")
        search.submit()
        wait_for("Events matching x@example.com")
        browser.find_element(By.LINK_TEXT, "2").click()
        wait_for("What Vbout sent")
        assert "Event 2" in browser.page_source
        pre = browser.find_element(By.TAG_NAME, "pre").text
        assert XSS in pre  # shown as text...
        assert browser.title != "pwned"  # ...and never run
        assert browser.execute_script("return document.scripts.length") == 0

        os.remove(os.path.join(admin_site.folder, "fail"))
        browser.get(page)
        wait_for("Failed deliveries")
        retry = [b for b in browser.find_elements(By.TAG_NAME, "button") if b.text == "Retry"]
        assert len(retry) == 2  # both events' flaky deliveries failed
        event_id = retry[0].find_element(By.XPATH, "..").find_element(By.NAME, "event_id").get_attribute("value")
        retry[0].click()
        wait_for("<h2>Event %s</h2>" % event_id)
        assert admin_site.rows("SELECT status FROM deliveries WHERE event_id = ?", (int(event_id),))[0]["status"] == "done"

        [b for b in browser.find_elements(By.TAG_NAME, "button") if b.text == "Sign out"][0].click()
        wait_for('name="admin_key"')
        assert browser.get_cookie("vbout_admin") is None
    finally:
        server.close()
