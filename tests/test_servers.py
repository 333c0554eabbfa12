"""The long-running faces: gunicorn, Passenger's way of loading an app, and mod_wsgi's (no sys.path)."""

import importlib.util
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import ROOT, SECRET, vbout_body, write_config


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/x-www-form-urlencoded"})
    with opener.open(request, timeout=30) as response:
        return response.status, json.loads(response.read())


def test_gunicorn_serves_listener_application(tmp_path):
    pytest.importorskip("gunicorn")
    config = write_config(tmp_path)
    port = free_port()
    env = dict(os.environ, VBOUT_LISTENER_CONFIG=config)
    server = subprocess.Popen([sys.executable, "-m", "gunicorn", "--bind", "127.0.0.1:%d" % port, "--workers", "2",
                               "--threads", "4", "listener:application"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = "http://127.0.0.1:%d/listener.py?key=%s" % (port, SECRET)
        deadline = time.time() + 30
        while True:
            try:
                status, answer = post(url, vbout_body(1))
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        assert status == 200 and answer["event_id"] == 1
        assert post(url, vbout_body(1))[1]["duplicate"] is True
    finally:
        server.terminate()
        server.wait(15)


def load_as(path, name):
    """Load a file as a module the way Passenger's wsgi loader and mod_wsgi do: by path, under another
    name, with neither its folder nor the working directory on sys.path."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_passenger_style_load_finds_config_and_handlers(tmp_path, monkeypatch):
    app = tmp_path / "app"
    app.mkdir()
    shutil.copy2(os.path.join(ROOT, "listener.py"), str(app))
    shutil.copytree(os.path.join(ROOT, "handlers"), str(app / "handlers"))
    write_config(app)
    with open(str(app / "config.ini"), "a") as f:
        f.write("[handlers]\nenabled = jsonl\n")
    monkeypatch.chdir(str(tmp_path))  # not the app's folder
    monkeypatch.delenv("VBOUT_LISTENER_CONFIG", raising=False)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if os.path.abspath(p or ".") not in (str(app), ROOT)])
    module = load_as(str(app / "listener.py"), "passenger_wsgi")
    body = vbout_body(2)
    environ = {"REQUEST_METHOD": "POST", "QUERY_STRING": "key=" + SECRET, "CONTENT_LENGTH": str(len(body)),
               "CONTENT_TYPE": "application/x-www-form-urlencoded", "wsgi.input": io.BytesIO(body),
               "wsgi.errors": io.StringIO(), "wsgi.multithread": True, "wsgi.run_once": False}
    status = []
    answer = json.loads(b"".join(module.application(environ, lambda s, h, e=None: status.append(s))))
    assert status == ["200 OK"] and answer["event_id"] == 1
    assert (app / "data" / "events.sqlite3").exists() and (app / "data" / "events.jsonl").exists()
