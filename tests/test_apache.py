"""Deployment on a real Apache 2.4: CGI with the shipped .htaccess, and mod_wsgi daemon mode.

Marked `apache`: skipped with the reason where Apache cannot run (not root, not installed), but
never under CI, where tests/run.py installs apache2 and libapache2-mod-wsgi-py3 first.
"""

import concurrent.futures
import http.server
import json
import os
import sqlite3
import subprocess
import threading

import pytest

import apache
import listener
from conftest import PHP, SECRET, query

WHY = apache.missing()
pytestmark = [pytest.mark.apache,
              pytest.mark.skipif(WHY is not None and not os.environ.get("CI"), reason=WHY or "")]
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
CONFIG = "[listener]\nsecret = %s\nlog_file = data/listener.log\n" % SECRET

PHP_BODY = """echo http_build_query([
    'transactionid' => '%s',
    'contact' => ['id' => '42', 'email' => 'ana@example.com', 'phone' => '+1 555 0100',
                  'profile_url' => 'https://app.vbout.com/Contact/42'],
    'fields' => [['id' => '7', 'name' => 'First Name', 'value' => 'Ana'],
                 ['id' => '8', 'name' => 'City', 'value' => 'São Paulo & Rio']],
    'campaigns-opened' => [['id' => '700', 'name' => 'Newsletter', 'open_date' => '2026-11-26 10:00:00']],
    'lead-status' => ['score' => '42', 'label' => 'Hot'],
]);"""


@pytest.fixture(scope="module")
def server():
    if WHY and os.environ.get("CI"):
        pytest.fail("CI must run the Apache tests: %s" % WHY)
    instance = apache.Apache(wsgi=True, config_text=CONFIG)
    yield instance
    instance.close()


FACES = ["cgi", "wsgi", "embedded"]


def url(server, face, key=SECRET):
    base = {"cgi": server.cgi_url, "wsgi": server.wsgi_url, "embedded": server.embedded_url}[face]
    return base + ("?key=" + key if key else "")


def database(server, face):
    folder = server.site if face == "cgi" else server.private
    return os.path.join(folder, "data", "events.sqlite3")


def rows(server, face, sql="SELECT * FROM events ORDER BY id", params=()):
    return query(database(server, face), sql, params)


def php_body(transaction_id):
    if PHP is None:
        pytest.skip("php-cli is not installed")
    return subprocess.check_output([PHP, "-r", PHP_BODY % transaction_id])


@pytest.mark.parametrize("face", FACES)
def test_apache_health_check(server, face):
    status, headers, body = server.request(url(server, face))
    assert status == 200 and json.loads(body)["status"] == "ready"
    assert json.loads(body)["server"] == {"cgi": "cgi", "wsgi": "mod_wsgi daemon", "embedded": "mod_wsgi embedded"}[face]
    assert headers["Content-Type"] == "application/json; charset=utf-8"


@pytest.mark.parametrize("face", FACES)
def test_apache_php_encoded_vbout_post_is_stored_with_its_tree(server, face):
    body = php_body("php-" + face)
    status, _, answer = server.request(url(server, face), body, headers=FORM)
    assert status == 200, answer
    answer = json.loads(answer)
    (row,) = rows(server, face, "SELECT * FROM events WHERE id = ?", (answer["event_id"],))
    tree = json.loads(row["payload"])
    assert tree["fields"] == [{"id": "7", "name": "First Name", "value": "Ana"},
                              {"id": "8", "name": "City", "value": "São Paulo & Rio"}]
    assert tree["contact"]["email"] == "ana@example.com" and tree["lead-status"] == {"score": "42", "label": "Hot"}
    assert row["raw_body"] == body and row["transaction_id"] == "php-" + face


@pytest.mark.parametrize("face", FACES)
def test_apache_wrong_key_is_403_and_stores_nothing(server, face):
    before = len(rows(server, face))
    status, _, body = server.request(url(server, face, key="guess-guess-guess-guess"), b"a=1", headers=FORM)
    assert status == 403 and json.loads(body)["error"] == "The key is missing or wrong."
    assert len(rows(server, face)) == before


@pytest.mark.parametrize("face", FACES)
def test_apache_other_method_is_405_with_allow(server, face):
    status, headers, body = server.request(url(server, face), b"a=1", method="PUT", headers=FORM)
    assert status == 405 and headers["Allow"] == "GET, HEAD, POST" and json.loads(body)["status"] == 405


@pytest.mark.parametrize("face", FACES)
def test_apache_5mb_body_is_413_answered_whole(server, face):
    """Under mod_cgid an unread body cuts the answer off (curl error 18): the listener drains it."""
    status, _, body = server.request(url(server, face), b"a=" + b"x" * (5 * 1024 * 1024), headers=FORM)
    assert status == 413 and json.loads(body)["error"].startswith("The body is larger than")


@pytest.mark.parametrize("face", FACES)
def test_apache_repeated_transactionid_is_stored_once(server, face):
    answers = [json.loads(server.request(url(server, face), b"transactionid=dup-%s&a=%d" % (face.encode(), i),
                                         headers=FORM)[2]) for i in range(3)]
    assert [a["duplicate"] for a in answers] == [False, True, True]
    assert len(rows(server, face, "SELECT id FROM events WHERE transaction_id = ?", ("dup-" + face,))) == 1


PRIVATE = ["config.ini", ".htaccess", "data/events.sqlite3", "data/events.sqlite3-wal",
           "data/events.sqlite3-shm", "data/spool.jsonl", "data/listener.log", "handlers/forward.py",
           "handlers/__init__.py", "handlers/", "data/", "", "listener.py.bak"]


def test_apache_private_files_are_not_downloadable():
    """With their own Apache: the files made here must not disturb the other tests' live database."""
    import pwd
    instance = apache.Apache(config_text=CONFIG + "spool_file = data/spool.jsonl\n")
    try:
        instance.request(instance.cgi_url + "?key=" + SECRET, b"transactionid=private-files", headers=FORM)
        data = os.path.join(instance.site, "data")
        holder = sqlite3.connect(os.path.join(data, "events.sqlite3"))  # keeps the real -wal and -shm in place
        holder.execute("SELECT count(*) FROM events").fetchone()
        www = pwd.getpwnam("www-data")
        for name in ("spool.jsonl", os.path.join("..", "listener.py.bak")):
            path = os.path.join(data, name)
            with open(path, "w") as f:
                f.write("private")
            os.chown(path, www.pw_uid, www.pw_gid)
        for name in PRIVATE:
            status, _, body = instance.request(instance.url + "/private/vbout/" + name)
            assert status in (403, 404), name
            assert b"private" not in body and SECRET.encode() not in body and b"SQLite" not in body, name
        holder.close()
    finally:
        instance.close()


def test_apache_wsgi_reads_setenv_config_outside_the_web_root(server):
    status, _, body = server.request(url(server, "wsgi"), b"transactionid=setenv", headers=FORM)
    assert status == 200
    assert os.path.exists(os.path.join(server.private, "data", "events.sqlite3"))
    assert not os.path.exists(os.path.join(server.app, "data"))


@pytest.mark.parametrize("face", ["cgi", "wsgi"])
def test_apache_2000_posts_at_concurrency_32(server, face):
    def post(i):
        return server.request(url(server, face), b"transactionid=load-%s-%d&contact[email]=c%d@x.y" % (
            face.encode(), i, i), headers=FORM, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(post, range(2000)))
    statuses = [status for status, _, _ in results]
    assert statuses.count(200) == 2000, sorted(set(statuses))
    answered = [json.loads(body) for _, _, body in results]
    assert not any(a.get("spooled") for a in answered)
    stored = rows(server, face, "SELECT transaction_id FROM events WHERE transaction_id LIKE ?",
                  ("load-%s-%%" % face,))
    assert len(stored) == 2000 and len({r["transaction_id"] for r in stored}) == 2000
    assert "Traceback" not in server.error_log()


def test_apache_cgi_proxy_header_does_not_reach_the_forward_handler(tmp_path):
    """httpoxy: a request's `Proxy:` header becomes HTTP_PROXY under CGI; it must not redirect us."""
    seen = {"crm": [], "trap": []}

    def peer(name):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                seen[name].append(self.path)
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    crm, trap = peer("crm"), peer("trap")
    config = CONFIG + "[handlers]\nenabled = crm\n[handler:crm]\nmodule = forward\nurl = http://127.0.0.1:%d/x\n" % (
        crm.server_port)
    instance = apache.Apache(config_text=config)
    try:
        status, _, body = instance.request(instance.cgi_url + "?key=" + SECRET, b"transactionid=proxy", headers=dict(
            FORM, Proxy="http://127.0.0.1:%d" % trap.server_port))
        assert status == 200, body
        assert seen["crm"] == ["/x"] and seen["trap"] == []
        conn = sqlite3.connect(os.path.join(instance.site, "data", "events.sqlite3"))
        assert conn.execute("SELECT status FROM deliveries").fetchall() == [("done",)]
    finally:
        instance.close()
        crm.shutdown()
        trap.shutdown()


def test_apache_cgi_without_htaccess_handling_is_caught_by_check(tmp_path):
    """Where .htaccess is ignored (AllowOverride None), `check --url` finds the data files exposed."""
    extra = '<Directory "{root}/htdocs/private">\n    AllowOverride None\n    Options +ExecCGI\n' \
            '    AddHandler cgi-script .py\n</Directory>\n'
    instance = apache.Apache(config_text=CONFIG, extra="")
    try:
        with open(os.path.join(instance.root, "httpd.conf"), "a") as f:
            f.write(extra.format(root=instance.root))
        instance.stop()
        instance.start()
        instance.request(instance.cgi_url + "?key=" + SECRET, b"transactionid=exposed", headers=FORM)
        result = subprocess.run(["/usr/bin/python3", os.path.join(instance.site, "listener.py"), "check",
                                 "--url", instance.cgi_url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env={"PATH": apache.SERVER_PATH})
        assert result.returncode == 1
        assert "config.ini can be downloaded" in result.stdout
        assert "fix:" in result.stdout
    finally:
        instance.close()


def test_passenger_runs_listener_py_as_its_startup_file():
    """cPanel's "Setup Python App": startup file listener.py, entry point application; no passenger_wsgi.py."""
    if not os.path.exists(os.path.join(apache.MODULES, "mod_passenger.so")):
        if os.environ.get("CI"):
            pytest.fail("CI must run the Passenger test: libapache2-mod-passenger is not installed")
        pytest.skip("libapache2-mod-passenger is not installed (tests/run.py installs it as root)")
    instance = apache.Passenger(CONFIG)
    try:
        status, _, body = instance.request(instance.url + "/listener.py?key=" + SECRET, timeout=90)
        assert status == 200 and json.loads(body)["server"] == "passenger"
        status, _, body = instance.request(instance.url + "/anything?key=" + SECRET, php_body("passenger"),
                                           headers=FORM, timeout=90)
        assert status == 200 and json.loads(body)["event_id"] == 1
        conn = sqlite3.connect(os.path.join(instance.app, "data", "events.sqlite3"))
        assert conn.execute("SELECT transaction_id FROM events").fetchall() == [("passenger",)]
        assert not os.path.exists(os.path.join(instance.app, "passenger_wsgi.py"))
        assert "Traceback" not in instance.error_log()
    finally:
        instance.close()
