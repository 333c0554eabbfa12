"""The command line: serve, init, spool, and --help on every command."""

import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import time
import urllib.request

import pytest

import listener
from conftest import ROOT, SECRET, vbout_body, write_config

LISTENER = os.path.join(ROOT, "listener.py")


def run(*args, config=None, env=None):
    command = [sys.executable, LISTENER] + (["--config", config] if config else []) + list(args)
    environment = dict(os.environ, **(env or {}))
    environment.pop("GATEWAY_INTERFACE", None)
    return subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60,
                          env=environment)


@pytest.mark.parametrize("command", ["serve", "init", "spool"])
def test_cli_every_command_has_help(command):
    result = run(command, "--help")
    assert result.returncode == 0 and "usage: listener.py " + command in result.stdout


def test_cli_without_command_prints_help():
    result = run()
    assert result.returncode == 2 and "serve" in result.stdout and "init" in result.stdout


class Server:
    def __init__(self, *args, config=None):
        command = [sys.executable, LISTENER] + (["--config", config] if config else []) + ["serve", "--port", "0"]
        self.proc = subprocess.Popen(command + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.lines = []
        deadline = time.time() + 30
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            self.lines.append(line)
            if line.startswith("Send Vbout's calls to: "):
                self.url = line.split(": ", 1)[1].strip()
                return
        raise AssertionError("serve did not start: %r" % self.lines)

    def close(self):
        self.proc.terminate()
        self.proc.wait(10)


def http(url, body=None, content_type="application/x-www-form-urlencoded"):
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type} if body else {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_serve_without_secret_makes_one_for_the_run(tmp_path):
    config = write_config(tmp_path, secret="")
    server = Server(config=config)
    try:
        assert "temporary" in "".join(server.lines)
        assert server.url.startswith("http://127.0.0.1:") and "key=" in server.url
        assert http(server.url)[1]["status"] == "ready"
        status, answer = http(server.url, vbout_body(2))
        assert status == 200 and answer["event_id"] == 1
        wrong = server.url.split("key=")[0] + "key=guess-guess-guess-guess"
        assert http(wrong, b"a=1")[0] == 403
    finally:
        server.close()
    conn = sqlite3.connect(str(tmp_path / "data" / "events.sqlite3"))
    assert conn.execute("SELECT contact_email FROM events").fetchone()[0] == "contact2@example.com"


def test_serve_uses_the_configured_secret(tmp_path):
    server = Server(config=write_config(tmp_path))
    try:
        assert server.url.endswith("key=" + SECRET)
        assert http(server.url, b"transactionid=5")[0] == 200
    finally:
        server.close()


def test_serve_refuses_a_broken_config(tmp_path):
    result = run("serve", config=write_config(tmp_path, max_depth="deep"))
    assert result.returncode == 2 and "[listener] max_depth" in result.stderr


def test_init_writes_a_secret_keeping_comments(tmp_path):
    config = tmp_path / "config.ini"
    shutil.copy(os.path.join(ROOT, "config.ini"), str(config))
    before = config.read_text()
    result = run("init", "--url", "https://example.com/private/vbout/listener.py", config=str(config))
    assert result.returncode == 0, result.stderr
    listener._config_cache.clear()
    secret = listener.load_config(str(config)).secret[0].decode()
    assert len(secret) >= 32
    assert "https://example.com/private/vbout/listener.py?key=" + secret in result.stdout
    after = config.read_text()
    assert [l for l in before.splitlines() if l.startswith("#")] == [l for l in after.splitlines() if l.startswith("#")]
    assert stat.S_IMODE(os.stat(str(tmp_path / "data")).st_mode) == 0o700
    assert os.path.exists(str(tmp_path / "data" / "events.sqlite3"))
    again = run("init", config=str(config))
    assert again.returncode == 0 and "already set" in again.stdout
    assert listener.load_config(str(config)).secret[0].decode() == secret


def test_init_creates_a_missing_config(tmp_path):
    config = tmp_path / "config.ini"
    result = run("init", config=str(config))
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(os.stat(str(config)).st_mode) == 0o600
    assert listener.load_config(str(config)).secret


def test_spool_command_imports_and_is_silent_when_idle(tmp_path):
    config_path = write_config(tmp_path)
    config = listener.load_config(config_path)
    row = listener._event_row({"transactionid": "s1"}, b"transactionid=s1", "POST", None, "127.0.0.1")
    listener.spool_append(config, row)
    result = run("spool", config=config_path)
    assert result.returncode == 0 and "imported 1 spooled events" in result.stdout
    idle = run("spool", config=config_path)
    assert idle.returncode == 0 and idle.stdout == ""
    conn = sqlite3.connect(config.database)
    assert conn.execute("SELECT transaction_id FROM events").fetchall() == [("s1",)]


def test_readme_serve_command_works_on_a_fresh_clone(tmp_path):
    """`python3 listener.py serve` in a copy of what git tracks, with the shipped config.ini as it is."""
    tracked = subprocess.check_output(["git", "ls-files"], cwd=ROOT, text=True).split()
    for name in tracked:
        if not name.startswith("tests/"):
            os.makedirs(str(tmp_path / os.path.dirname(name)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), str(tmp_path / name))
    env = dict(os.environ)
    env.pop("VBOUT_LISTENER_CONFIG", None)
    proc = subprocess.Popen([sys.executable, "listener.py", "serve", "--port", "0"], cwd=str(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = [proc.stdout.readline() for _ in range(4)]
        assert "temporary" in lines[1]
        url = lines[2].split(": ", 1)[1].strip()
        status, answer = http(url, vbout_body(9))
        assert status == 200 and answer["event_id"] == 1
    finally:
        proc.terminate()
        proc.wait(10)
    assert os.path.exists(str(tmp_path / "data" / "events.sqlite3"))
