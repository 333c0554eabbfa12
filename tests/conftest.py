"""Shared fixtures: a private config and data folder per test, and the listener's app under WebTest."""

import io
import os
import shutil
import sqlite3
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import listener  # noqa: E402

SECRET = "test-secret-0123456789abcdef"
PHP = shutil.which("php")
needs_php = pytest.mark.skipif(PHP is None and not os.environ.get("CI"),
                               reason="php-cli is not installed (tests/run.py installs it as root)")


def write_config(folder, **settings):
    """A config.ini in folder with the test secret and any [listener] settings given."""
    values = {"secret": SECRET, "log_file": "data/listener.log"}
    values.update(settings)
    path = os.path.join(str(folder), "config.ini")
    with open(path, "w") as f:
        f.write("[listener]\n")
        for key, value in values.items():
            if value is not None:
                f.write("%s = %s\n" % (key, value))
    return path


def query(database, sql="SELECT * FROM events ORDER BY id", params=()):
    """Rows of a SQLite file as dicts; [] while the file does not exist."""
    if not os.path.exists(database):
        return []
    conn = sqlite3.connect(database)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql, params)]
    finally:
        conn.close()


def call(environ):
    """Call the application directly with a minimal environ, from any thread: (status, headers, body)."""
    environ.setdefault("wsgi.errors", io.StringIO())
    seen = []
    body = b"".join(listener.application(environ, lambda s, h, e=None: seen.append((s, h))))
    return seen[0][0], dict(seen[0][1]), body


class Site:
    """One listener installation in a temporary folder, called through WebTest."""

    def __init__(self, folder, **settings):
        import webtest
        self.folder = str(folder)
        self.config_path = write_config(folder, **settings)
        self.app = webtest.TestApp(listener.application, lint=True,
                                   extra_environ={"VBOUT_LISTENER_CONFIG": self.config_path,
                                                  "REMOTE_ADDR": "198.51.100.7"})

    def reconfigure(self, **settings):
        write_config(self.folder, **settings)
        os.utime(self.config_path, (1, 1))  # a new mtime even within the same clock tick
        listener._config_cache.clear()

    @property
    def config(self):
        return listener.load_config(self.config_path)

    def url(self, query="", key=SECRET):
        parts = ["key=" + key] if key is not None else []
        if query:
            parts.append(query)
        return "/listener.py?" + "&".join(parts)

    def post(self, body, status=200, content_type="application/x-www-form-urlencoded", key=SECRET, **kw):
        return self.app.post(self.url(key=key), body, status=status,
                             headers={"Content-Type": content_type}, **kw)

    def rows(self, sql="SELECT * FROM events ORDER BY id", params=()):
        return query(self.config.database, sql, params)

    def log_text(self):
        path = os.path.join(self.folder, "data", "listener.log")
        return open(path).read() if os.path.exists(path) else ""


@pytest.fixture
def site(tmp_path):
    listener._config_cache.clear()
    yield Site(tmp_path)
    listener._config_cache.clear()


def vbout_body(n=1, fields=10, activities=2):
    """A typical Vbout form POST (~3.3 KB with the defaults), encoded as http_build_query does."""
    from urllib.parse import quote_plus
    pairs = [("transactionid", str(123456789 + n)), ("contact[id]", str(5000 + n)),
             ("contact[email]", "contact%d@example.com" % n), ("contact[phone]", "+1 555 0100"),
             ("contact[profile_url]", "https://app.vbout.com/Contact/%d" % n)]
    names = ["First Name", "Last Name", "Company", "Country", "City", "Job Title", "Phone", "Website",
             "Notes", "Source"]
    for i in range(fields):
        pairs += [("fields[%d][id]" % i, str(100 + i)), ("fields[%d][name]" % i, names[i % 10]),
                  ("fields[%d][value]" % i, "Value %d for contact %d" % (i, n))]
    for i in range(activities):
        pairs += [("campaigns-opened[%d][id]" % i, str(700 + i)),
                  ("campaigns-opened[%d][name]" % i, "Newsletter #%d" % i),
                  ("campaigns-opened[%d][open_date]" % i, "2026-11-26 10:00:00"),
                  ("links-clicked[%d][url]" % i, "https://example.com/offer?id=%d&utm_source=vbout" % i),
                  ("links-clicked[%d][clicks]" % i, str(i + 1)),
                  ("pages-visited[%d][page]" % i, "https://example.com/page/%d" % i),
                  ("pages-visited[%d][visit_date]" % i, "2026-11-26 09:00:00"),
                  ("automation-triggered[%d][id]" % i, str(40 + i)),
                  ("automation-triggered[%d][name]" % i, "Welcome journey"),
                  ("automation-triggered[%d][trigger_date]" % i, "2026-11-26 08:00:00"),
                  ("goals-reached[%d][id]" % i, str(9 + i)),
                  ("goals-reached[%d][name]" % i, "Signed up"),
                  ("goals-reached[%d][reach_date]" % i, "2026-11-26 08:30:00"),
                  ("webhooks-triggered[%d][id]" % i, str(3 + i)),
                  ("webhooks-triggered[%d][name]" % i, "CRM sync"),
                  ("webhooks-triggered[%d][trigger_date]" % i, "2026-11-26 08:31:00"),
                  ("lead-score[%d][id]" % i, str(1 + i)),
                  ("lead-score[%d][name]" % i, "Engagement"),
                  ("lead-score[%d][score]" % i, str(10 * i)),
                  ("lead-score[%d][score_date]" % i, "2026-11-26 08:32:00")]
    pairs += [("lead-status[score]", "42"), ("lead-status[label]", "Hot")]
    return "&".join("%s=%s" % (quote_plus(k), quote_plus(v)) for k, v in pairs).encode("ascii")


def pytest_configure(config):
    config.addinivalue_line("markers", "apache: deployment tests on a private Apache (need root and apache2;"
                                       " CI runs them, `-m 'not apache'` skips them)")
