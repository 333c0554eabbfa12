"""The operator's commands, each against a database filled by real requests through `application`."""

import csv
import io
import json
import os
import subprocess
import sys
import time

import pytest

import listener
from conftest import ROOT, SECRET, Site, vbout_body

LISTENER = os.path.join(ROOT, "listener.py")


@pytest.fixture
def filled(tmp_path):
    """Five events (one repeated, one by GET), contacts/jsonl/csv handlers, one failing command handler."""
    site = Site(tmp_path)
    with open(site.config_path, "a") as f:
        f.write("[handlers]\nenabled = contacts, jsonl, csv, flaky\n[handler:flaky]\nmodule = command\n"
                "command = %s -c 'import sys; sys.exit(1)'\nonly_if = lead-status.label == Cold\n" % sys.executable)
    listener._config_cache.clear()
    for n in (1, 2, 3):
        site.post(vbout_body(n))
    site.post(vbout_body(2))  # a repeat
    site.post(b"transactionid=cold&contact[email]=cold@example.com&lead-status[label]=Cold")
    site.app.get(site.url("email=ana%40example.com&First+Name=Ana&country=US"), status=200)
    return site


def run(site, *args):
    env = dict(os.environ)
    env.pop("GATEWAY_INTERFACE", None)
    return subprocess.run([sys.executable, LISTENER, "--config", site.config_path] + list(args),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60, env=env)


@pytest.mark.parametrize("command", ["events", "stats", "prune", "forget", "send-sample", "learn", "tail"])
def test_tools_every_command_has_help(command):
    result = subprocess.run([sys.executable, LISTENER, command, "--help"], stdout=subprocess.PIPE, text=True)
    assert result.returncode == 0 and "usage: listener.py " + command in result.stdout


def test_events_lists_newest_first_with_deliveries(filled):
    result = run(filled, "events")
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and len(lines) == 5
    assert lines[0].split()[0] == "5" and "ana@example.com" in lines[0]
    assert "contact2@example.com" in lines[3] and "(+1 repeats)" in lines[3]
    assert "contacts=done" in lines[3] and "flaky=skipped" in lines[3]


def test_events_filters(filled):
    assert [e["id"] for e in json.loads(run(filled, "events", "--json", "--email", "CONTACT1@example.com").stdout)] == [1]
    assert [e["id"] for e in json.loads(run(filled, "events", "--json", "--transaction", "cold").stdout)] == [4]
    failed = json.loads(run(filled, "events", "--json", "--status", "failed").stdout)
    assert [e["id"] for e in failed] == [4] and failed[0]["deliveries"]["flaky"] == "failed"
    assert json.loads(run(filled, "events", "--json", "--since", "1h").stdout)[0]["id"] == 5
    assert json.loads(run(filled, "events", "--json", "--until", "2000-01-01").stdout) == []
    assert run(filled, "events", "--since", "yesterday").returncode == 2


def test_events_show_prints_the_tree_and_deliveries(filled):
    result = run(filled, "events", "show", "1")
    assert result.returncode == 0 and "transaction_id: 123456790" in result.stdout
    assert "delivery:       contacts done, 1 attempt(s)" in result.stdout
    assert '"First Name"' in result.stdout
    shown = json.loads(run(filled, "events", "show", "4", "--json").stdout)
    assert shown["data"]["lead-status"] == {"label": "Cold"}
    assert {d["handler"]: d["status"] for d in shown["deliveries"]}["flaky"] == "failed"
    assert run(filled, "events", "show", "99").returncode == 1


def test_events_export_csv_is_flattened(filled, tmp_path):
    out = tmp_path / "export.csv"
    result = run(filled, "events", "export", "--format", "csv", "--output", str(out))
    assert result.returncode == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == 5 and rows[0]["contact_email"] == "contact1@example.com"
    assert rows[0]["First Name"] == "Value 0 for contact 1" and rows[0]["campaigns_opened"] == "2"
    assert rows[0]["lead_label"] == "Hot" and rows[0]["contact_phone"] == "'+1 555 0100"


def test_events_export_jsonl(filled):
    lines = [json.loads(line) for line in run(filled, "events", "export", "--format", "jsonl").stdout.splitlines()]
    assert [e["id"] for e in lines] == [1, 2, 3, 4, 5] and lines[4]["data"] == {"email": "ana@example.com",
                                                                                 "First Name": "Ana", "country": "US"}


def test_stats(filled):
    summary = json.loads(run(filled, "stats", "--json").stdout)
    assert summary["events"] == 5 and summary["last_event"]["id"] == 5
    assert summary["per_day"][0]["events"] == 5 and summary["per_day"][0]["repeats"] == 1
    assert {"handler": "flaky", "status": "failed", "count": 1} in summary["deliveries"]
    text = run(filled, "stats").stdout
    assert "events: 5; last received" in text and "deliveries: flaky failed: 1" in text


def test_prune_removes_old_events_and_keeps_contacts(filled):
    conn = listener.connect(filled.config)
    with listener.transaction(conn):
        conn.execute("UPDATE events SET received_at = '2020-01-01T00:00:00Z' WHERE id IN (1, 2)")
    result = run(filled, "prune", "--older-than", "90d")
    assert result.returncode == 0 and "events: 2 removed" in result.stdout and "deliveries: 8 removed" in result.stdout
    assert [r["id"] for r in filled.rows()] == [3, 4, 5]
    assert len(filled.rows("SELECT * FROM contacts")) == 5  # contacts untouched unless asked
    with listener.transaction(conn):
        conn.execute("UPDATE contacts SET last_seen = '2020-01-01T00:00:00Z' WHERE contact_key = 'id:5001'")
    result = run(filled, "prune", "--older-than", "90d", "--contacts")
    assert "contacts: contacts: 1 removed" in result.stdout
    assert len(filled.rows("SELECT * FROM contacts")) == 4


def test_forget_leaves_no_trace_in_any_file(filled):
    config = filled.config
    listener.spool_append(config, listener._event_row({"contact": {"email": "contact2@example.com"}},
                                                      b"contact[email]=contact2%40example.com", "POST", None, "x"))
    result = run(filled, "forget", "Contact2@Example.com")
    assert result.returncode == 0
    assert "events: 1 removed (ids 2)" in result.stdout and "spool: 1 records removed" in result.stdout
    assert "contacts: 1 contact, 10 fields, 14 activities, 1 lead statuses removed" in result.stdout
    assert "jsonl: 1 lines removed" in result.stdout and "csv: 1 rows removed" in result.stdout
    data = os.path.join(filled.folder, "data")
    for name in os.listdir(data):
        content = open(os.path.join(data, name), "rb").read().lower()
        assert b"contact2@example.com" not in content and b"contact2%40example.com" not in content, name
    assert len(filled.rows()) == 4 and b"contact1@example.com" in open(config.database, "rb").read()


def test_send_sample_against_serve(tmp_path):
    from test_cli import Server
    from conftest import write_config
    config = write_config(tmp_path)
    server = Server(config=config)
    try:
        base = server.url.split("?")[0]
        for args in ([], ["--json"], ["--get"]):
            result = subprocess.run([sys.executable, LISTENER, "--config", config, "send-sample", base] + args,
                                    stdout=subprocess.PIPE, text=True, timeout=60)
            assert result.returncode == 0 and result.stdout.startswith('200 {"ok": true, "event_id": ')
        wrong = subprocess.run([sys.executable, LISTENER, "send-sample", base + "?key=nope-nope-nope-nope"],
                               stdout=subprocess.PIPE, text=True, timeout=60)
        assert wrong.returncode == 1 and wrong.stdout.startswith("403 ")
    finally:
        server.close()
    site_rows = listener.find_events(listener.connect(listener.load_config(config)))
    assert [e["method"] for e in site_rows] == ["GET", "POST", "POST"]
    tree = listener.event_detail(listener.connect(listener.load_config(config)), 1)["data"]
    assert tree["fields"][0] == {"id": "1", "name": "First Name", "value": "Ana"} and tree["lead-status"]["label"] == "Hot"


def test_learn_prints_a_field_map(filled):
    result = run(filled, "learn")
    assert "custom fields: First Name (3)" in result.stdout and "GET parameters: email (1)" in result.stdout
    assert "    first_name = fields.First Name" in result.stdout and "    lead_status = lead-status.label" in result.stdout
    seen = json.loads(run(filled, "learn", "--json").stdout)
    assert seen["content_types"] == {"application/x-www-form-urlencoded": 4, "GET": 1}
    assert "email = contact.email" in seen["field_map"]


def test_tail_follows_new_events(filled):
    env = dict(os.environ)
    env.pop("GATEWAY_INTERFACE", None)
    proc = subprocess.Popen([sys.executable, LISTENER, "--config", filled.config_path, "tail", "--lines", "1",
                             "--interval", "0.2"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        first = proc.stdout.readline()
        assert first.split()[0] == "5"
        time.sleep(0.5)
        filled.post(b"transactionid=live&contact[email]=live@example.com")
        line = proc.stdout.readline()
        assert line.split()[0] == "6" and "live@example.com" in line
    finally:
        proc.terminate()
        proc.wait(10)


def test_parse_when():
    now = 1_800_000_000
    assert listener.parse_when("1d", now) == listener.utc_now(now - 86400)
    assert listener.parse_when("2026-11-01") == "2026-11-01"
    with pytest.raises(ValueError):
        listener.parse_when("soon")
