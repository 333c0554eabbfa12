"""The CGI face: listener.py run as a real subprocess with a CGI environment and the body on stdin."""

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile

import pytest

from conftest import ROOT, SECRET, vbout_body, write_config

SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.fixture
def upload():
    """A folder as a user would upload it: listener.py and config.ini, readable by the web server user."""
    folder = tempfile.mkdtemp(prefix="vbout-cgi-")
    os.chmod(folder, 0o755)
    shutil.copy2(os.path.join(ROOT, "listener.py"), folder)
    write_config(folder)
    os.chmod(os.path.join(folder, "config.ini"), 0o644)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def cgi(folder, body=b"", method="POST", query="key=" + SECRET, content_type="application/x-www-form-urlencoded",
        user=None, stdin=None, extra=None):
    """Run listener.py as Apache would: (status, headers, answer)."""
    env = {"GATEWAY_INTERFACE": "CGI/1.1", "REQUEST_METHOD": method, "QUERY_STRING": query,
           "SERVER_PROTOCOL": "HTTP/1.1", "SERVER_NAME": "localhost", "SERVER_PORT": "80",
           "SCRIPT_NAME": "/vbout/listener.py", "REMOTE_ADDR": "192.0.2.10", "PATH": os.environ["PATH"]}
    if method == "POST":
        env.update(CONTENT_LENGTH=str(len(body)), CONTENT_TYPE=content_type)
    env.update(extra or {})
    preexec, python = None, sys.executable
    if user is not None:
        python = SYSTEM_PYTHON  # pyenv's lives under /root, which the web server's user cannot enter

        def preexec():
            os.setgid(65534)
            os.setuid(65534)
    proc = subprocess.run([python, os.path.join(folder, "listener.py")], env=env, cwd="/",
                          input=None if stdin else body, stdin=stdin, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, preexec_fn=preexec, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    head, _, answer = proc.stdout.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("Status: ")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, json.loads(answer), proc.stderr.decode()


def test_cgi_post_is_stored(upload):
    body = vbout_body(1)
    status, headers, answer, _ = cgi(upload, body)
    assert status == 200 and answer == {"ok": True, "event_id": 1, "duplicate": False}
    assert headers["Content-Type"] == "application/json; charset=utf-8"
    assert int(headers["Content-Length"]) == len(json.dumps(answer, separators=(", ", ": ")))
    conn = sqlite3.connect(os.path.join(upload, "data", "events.sqlite3"))
    assert conn.execute("SELECT raw_body FROM events").fetchone()[0] == body


def test_cgi_health_check(upload):
    status, _, answer, _ = cgi(upload, method="GET")
    assert status == 200 and answer["status"] == "ready"


def test_cgi_error_drains_the_body_first(upload):
    """Under mod_cgid stdin and stdout share a socket: an unread body cuts the answer off."""
    body = b"a=" + b"x" * 300000
    with tempfile.TemporaryFile() as f:
        f.write(body)
        f.seek(0)
        status, _, answer, _ = cgi(upload, body, query="key=wrong-key-0000000000", stdin=f)
        assert status == 403 and answer["error"] == "The key is missing or wrong."
        assert f.tell() == len(body)  # the script read all of it before answering


def test_cgi_oversized_body_is_413_and_drained(upload):
    body = b"a=" + b"x" * (1024 * 1024 + 10)
    with tempfile.TemporaryFile() as f:
        f.write(body)
        f.seek(0)
        status, _, answer, _ = cgi(upload, body, stdin=f)
        assert status == 413 and f.tell() == len(body)


def test_cgi_logs_to_stderr_without_the_key(upload):
    write_config(upload, log_file=None)
    status, _, _, stderr = cgi(upload, b"transactionid=1")
    assert status == 200
    assert " POST 200 event=1 " in stderr and SECRET not in stderr


def test_cgi_proxy_header_is_not_an_http_proxy(upload):
    """httpoxy: a request's `Proxy:` header arrives as HTTP_PROXY; no handler may see it as a proxy."""
    os.makedirs(os.path.join(upload, "handlers"))
    with open(os.path.join(upload, "handlers", "seen.py"), "w") as f:
        f.write("import os, urllib.request\ndef handle(event, settings):\n"
                "    return {'env': os.environ.get('HTTP_PROXY'), 'urllib': urllib.request.getproxies().get('http')}\n")
    write_config(upload, log_file=None, respond_with="seen.env, seen.urllib")
    with open(os.path.join(upload, "config.ini"), "a") as f:
        f.write("[handlers]\nenabled = seen\n")
    status, _, answer, _ = cgi(upload, b"a=1", extra={"HTTP_PROXY": "http://198.51.100.1:3128"})
    assert status == 200 and answer["seen"] == {"env": None, "urllib": None}


def test_cgi_read_only_database_folder_spools_or_refuses(upload):
    """The web server's user cannot write the data folder: spooled elsewhere, or 503 with nothing stored."""
    user = "nobody" if os.geteuid() == 0 else None  # root ignores permission bits: run as the server would
    if user and not os.access(SYSTEM_PYTHON, os.X_OK):
        (pytest.fail if os.environ.get("CI") else pytest.skip)("running as root without %s to run the listener as nobody" % SYSTEM_PYTHON)
    data = os.path.join(upload, "data")
    spool = os.path.join(upload, "spool")
    os.makedirs(data)
    os.makedirs(spool)
    if user:
        os.chown(upload, 65534, 65534)
        for path in (data, spool, os.path.join(upload, "config.ini")):
            os.chown(path, 65534, 65534)
    write_config(upload, spool_file="spool/spool.jsonl", log_file=None)
    status, _, answer, _ = cgi(upload, b"transactionid=first", user=user)
    assert status == 200 and answer["event_id"] == 1
    os.chmod(data, 0o555)
    status, _, answer, stderr = cgi(upload, b"transactionid=second", user=user)
    assert status == 200 and answer["spooled"] is True
    assert "spooled" in stderr
    write_config(upload, log_file=None)  # the spool in the read-only folder too
    status, _, answer, _ = cgi(upload, b"transactionid=third", user=user)
    assert status == 503 and answer["error"] == "The event could not be stored; try again later."
    assert upload not in json.dumps(answer)
    os.chmod(data, 0o755)
    write_config(upload, spool_file="spool/spool.jsonl", log_file=None)
    status, _, answer, _ = cgi(upload, b"transactionid=fourth", user=user)
    assert status == 200
    conn = sqlite3.connect(os.path.join(data, "events.sqlite3"))
    stored = sorted(r[0] for r in conn.execute("SELECT transaction_id FROM events"))
    assert stored == ["first", "fourth", "second"]  # the spooled one came in once; the refused one never
