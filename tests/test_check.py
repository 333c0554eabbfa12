"""`listener.py check`, the deployment doctor: each problem found, each with its fix."""

import os
import shutil
import stat
import subprocess
import sys

import pytest

from conftest import ROOT, SECRET

STRONG = "Zq8-vT3kLw0pXr7_bN5yHc2MdF9sJa4"


@pytest.fixture
def upload(tmp_path):
    """listener.py and a healthy config.ini in a folder, as after `init`."""
    shutil.copy2(os.path.join(ROOT, "listener.py"), str(tmp_path))
    shutil.copytree(os.path.join(ROOT, "handlers"), str(tmp_path / "handlers"))
    config = tmp_path / "config.ini"
    config.write_text("[listener]\nsecret = %s\n" % STRONG)
    config.chmod(0o600)
    (tmp_path / "data").mkdir(mode=0o700)
    return tmp_path


def check(folder, *args):
    env = dict(os.environ)
    env.pop("VBOUT_LISTENER_CONFIG", None)
    result = subprocess.run([sys.executable, str(folder / "listener.py"), "check"] + list(args),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, timeout=60)
    problems = [line for line in result.stdout.splitlines() if line.startswith("problem: ")]
    return result.returncode, problems, result.stdout


def test_check_healthy_deployment_passes(upload):
    code, problems, out = check(upload)
    assert code == 0 and problems == [], out
    assert "ok: listener.py has Unix (LF) line endings" in out and "key=%s" % STRONG in out


def test_check_finds_crlf_line_endings(upload):
    path = upload / "listener.py"
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    code, problems, _ = check(upload)
    assert code == 1
    assert any("CRLF" in p and "binary mode" in p and "sed -i" in p for p in problems), problems


def test_check_finds_a_script_that_is_not_executable(upload):
    (upload / "listener.py").chmod(0o644)
    code, problems, _ = check(upload)
    assert code == 1 and any("not executable" in p and "chmod 755 listener.py" in p for p in problems)


def test_check_finds_a_world_readable_config(upload):
    (upload / "config.ini").chmod(0o644)
    code, problems, _ = check(upload)
    assert any("readable by every user" in p and "chmod 600" in p for p in problems)


@pytest.mark.parametrize("secret, text", [("", "secret is empty"), ("aaaaaaaaaaaaaaaaaaaaaaaaaa", "short or repetitive"),
                                          ("Zq8vT3kLw0pXr7bN", "short or repetitive")])
def test_check_finds_a_missing_or_weak_secret(upload, secret, text):
    (upload / "config.ini").write_text("[listener]\nsecret = %s\n" % secret)
    code, problems, _ = check(upload)
    assert code == 1 and any(text in p and "listener.py init" in p for p in problems)


def test_check_finds_an_open_data_folder(upload):
    (upload / "data").chmod(0o755)
    code, problems, _ = check(upload)
    assert any("open to other users" in p and "chmod 700" in p for p in problems)


def test_check_reports_a_config_error_and_a_broken_handler(upload):
    (upload / "config.ini").write_text("[listener]\nsecret = %s\n[handlers]\nenabled = crm\n[handler:crm]\n"
                                       "module = forward\nurl = nope\n" % STRONG)
    code, problems, _ = check(upload)
    assert code == 1 and any("[handler:crm] url" in p for p in problems)


def test_check_lists_the_handlers_that_load(upload):
    (upload / "config.ini").write_text("[listener]\nsecret = %s\n[handlers]\nenabled = jsonl\n" % STRONG)
    code, problems, out = check(upload)
    assert code == 0 and "ok: handler jsonl loads" in out


def test_check_url_calls_the_listener(upload):
    import time
    env = dict(os.environ)
    env.pop("VBOUT_LISTENER_CONFIG", None)
    server = subprocess.Popen([sys.executable, str(upload / "listener.py"), "serve", "--port", "0"],
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = ""
        deadline = time.time() + 20
        while not line.startswith("Send Vbout") and time.time() < deadline:
            line = server.stdout.readline()
        url = line.split(": ", 1)[1].split("?")[0]
        code, problems, out = check(upload, "--url", url)
        assert code == 0, out
        assert "answers the health check (server: WSGIServer)" in out
        assert "config.ini is not served" in out
    finally:
        server.terminate()
        server.wait(10)
