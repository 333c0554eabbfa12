"""Handlers: loading and config errors, the event views, only_if, inline and deferred runs,
deliver/retry/replay, and each shipped handler against a real peer on 127.0.0.1."""

import base64
import hashlib
import hmac
import http.server
import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

import listener
from conftest import ROOT, SECRET, Site, vbout_body, write_config

LISTENER = os.path.join(ROOT, "listener.py")


def handler_site(tmp_path, handlers, listener_settings=None, **sections):
    """A Site whose config enables `handlers` and has the given [handler:NAME] sections."""
    site = Site(tmp_path, **(listener_settings or {}))
    with open(site.config_path, "a") as f:
        f.write("\n[handlers]\nenabled = %s\n" % handlers)
        for key in ("run", "timeout", "max_attempts", "retry_delay"):
            if key in sections:
                f.write("%s = %s\n" % (key, sections.pop(key)))
        for name, values in sections.items():
            f.write("\n[handler:%s]\n" % name)
            for key, value in values.items():
                f.write("%s = %s\n" % (key, value.replace("\n", "\n    ")))
    listener._config_cache.clear()
    return site


def deliveries(site):
    return site.rows("SELECT event_id, handler, status, attempts, last_error, result FROM deliveries"
                     " ORDER BY event_id, handler")


def cli(site, *args):
    env = dict(os.environ)
    env.pop("GATEWAY_INTERFACE", None)
    return subprocess.run([sys.executable, LISTENER, "--config", site.config_path] + list(args),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120, env=env)


@pytest.fixture
def own_handlers(tmp_path, monkeypatch):
    """A handlers/ folder of the test's own, for handlers that raise or misbehave on purpose."""
    folder = tmp_path / "own_handlers"
    folder.mkdir()
    monkeypatch.setattr(listener, "HANDLERS_DIR", str(folder))

    def write(name, source):
        (folder / (name + ".py")).write_text(source)
    return write


# --- Loading and config errors -------------------------------------------------------------

def config_error(tmp_path, text):
    path = write_config(tmp_path)
    with open(path, "a") as f:
        f.write(text)
    listener._config_cache.clear()
    with pytest.raises(listener.ConfigError) as e:
        listener.load_config(path)
    return str(e.value)


def test_handler_unknown_module_is_a_config_error(tmp_path):
    message = config_error(tmp_path, "[handlers]\nenabled = contcts\n")
    assert "[handlers] enabled: 'contcts' is not a module in handlers/" in message
    assert "contacts, csv" in message


def test_handler_listed_twice_is_a_config_error(tmp_path):
    message = config_error(tmp_path, "[handlers]\nenabled = jsonl, jsonl\n")
    assert "handler 'jsonl' is listed twice" in message and "module = jsonl" in message


@pytest.mark.parametrize("name", ["../evil", "handlers.contacts", "a/b", "con tacts"])
def test_handler_name_cannot_be_a_path(tmp_path, name):
    assert "is not a handler name" in config_error(tmp_path, "[handlers]\nenabled = %s\n" % name)


def test_handler_module_cannot_be_a_path(tmp_path):
    message = config_error(tmp_path, "[handlers]\nenabled = crm\n[handler:crm]\nmodule = ../listener\n")
    assert "[handler:crm] module: '../listener' is not a module name" in message


def test_handler_without_handle_is_a_config_error(tmp_path, own_handlers):
    own_handlers("empty", "x = 1\n")
    message = config_error(tmp_path, "[handlers]\nenabled = empty\n")
    assert "handlers/empty.py has no handle(event, settings) function" in message


def test_handler_unknown_key_is_a_config_error(tmp_path):
    message = config_error(tmp_path, "[handlers]\nenabled = jsonl\n[handler:jsonl]\npaht = x.jsonl\n")
    assert "[handler:jsonl] paht: unknown key (hint: did you mean 'path'?)" in message


def test_handler_check_error_names_the_key(tmp_path):
    message = config_error(tmp_path, "[handlers]\nenabled = crm\n[handler:crm]\nmodule = forward\nurl = ftp://x\n")
    assert "[handler:crm] url: 'ftp://x' is not an http:// or https:// URL" in message


def test_handler_bad_only_if_is_a_config_error(tmp_path):
    message = config_error(tmp_path, "[handlers]\nenabled = jsonl\n[handler:jsonl]\nonly_if = == Hot\n")
    assert "[handler:jsonl] only_if" in message and "is not a condition" in message


def test_respond_with_must_name_an_inline_handler(tmp_path):
    path = write_config(tmp_path, respond_with="crm.id")
    with open(path, "a") as f:
        f.write("[handlers]\nenabled = crm\n[handler:crm]\nmodule = jsonl\nrun = deferred\n")
    listener._config_cache.clear()
    with pytest.raises(listener.ConfigError, match=r"respond_with: 'crm.id' names no inline handler"):
        listener.load_config(path)


def test_handler_section_of_a_disabled_handler_is_allowed(tmp_path):
    path = write_config(tmp_path)
    with open(path, "a") as f:
        f.write("[handlers]\nenabled =\n[handler:crm]\nmodule = forward\n")
    listener._config_cache.clear()
    assert listener.load_config(path).handlers == []


def test_user_handler_of_fifteen_lines_from_the_readme(tmp_path, own_handlers):
    readme = open(os.path.join(ROOT, "README.md")).read()
    source = readme.split("```python\n# handlers/hot_leads.py\n", 1)[1].split("```", 1)[0]
    assert len(source.strip().splitlines()) <= 15
    own_handlers("hot_leads", source)
    site = handler_site(tmp_path, "hot_leads", hot_leads={"path": "data/hot.txt"})
    site.post(vbout_body(1))
    assert open(str(tmp_path / "data" / "hot.txt")).read() == "contact1@example.com Hot\n"
    assert deliveries(site)[0]["status"] == "done"


# --- The event handed to handlers -----------------------------------------------------------

def test_event_views_over_vbout_sections():
    tree = listener.parse_form(vbout_body(3))
    event = listener.Event(9, "t", "2026-11-26T00:00:00Z", "POST", tree)
    assert event.contact == {"id": "5003", "email": "contact3@example.com", "phone": "+1 555 0100",
                             "profile_url": "https://app.vbout.com/Contact/3"}
    assert event.fields["First Name"] == "Value 0 for contact 3" and event.fields["101"] == "Value 1 for contact 3"
    assert len(event.fields) == 10 and "Company" in event.fields
    assert event.campaigns_opened[1]["name"] == "Newsletter #1"
    assert event.links_clicked[0]["url"].startswith("https://example.com/offer?id=0")
    assert event.pages_visited and event.automations_triggered and event.goals_reached
    assert event.webhooks_triggered[0]["name"] == "CRM sync" and event.lead_scores[1]["score"] == "10"
    assert event.lead_status == {"score": "42", "label": "Hot"}
    assert event.get("fields.First Name") == "Value 0 for contact 3"
    assert event.get("lead-status.label") == "Hot" and event.get("contact.email") == "contact3@example.com"
    assert event.get("links-clicked.1.clicks") == "2" and event.get("event.id") == 9
    assert event.get("no.such.thing", "x") == "x" and event.query == {}


@pytest.mark.parametrize("fields", [None, "", [], {}, "text"])
def test_event_views_tolerate_absent_or_empty_sections(fields):
    data = {"contact": "not a dict"}
    if fields is not None:
        data["fields"] = fields
    event = listener.Event(1, None, "2026-11-26T00:00:00Z", "POST", data)
    assert list(event.fields) == [] and event.fields.get("x") is None
    assert event.contact["email"] is None and event.campaigns_opened == [] and event.lead_status == {}


def test_event_views_accept_sections_keyed_by_id_or_single():
    data = listener.parse_form(b"fields[17][name]=Country&fields[17][value]=US&fields[4][name]=City"
                               b"&fields[4][value]=Austin&goals-reached[id]=9&goals-reached[name]=Signed+up"
                               b"&lead-status[0][score]=1&lead-status[0][label]=Cold"
                               b"&lead-status[1][score]=5&lead-status[1][label]=Warm")
    event = listener.Event(1, None, "t", "POST", data)
    assert event.fields["Country"] == "US" and event.fields["17"] == "US" and event.fields["4"] == "Austin"
    assert event.goals_reached == [{"id": "9", "name": "Signed up"}]
    assert event.lead_status == {"score": "5", "label": "Warm"}


def test_event_of_a_get_call_has_its_query():
    event = listener.Event(1, None, "t", "GET", {"email": "a@b.c", "First": "Ana"})
    assert event.query == {"email": "a@b.c", "First": "Ana"}
    assert event.contact["email"] == "a@b.c" and event.get("query.First") == "Ana" and event.get("First") == "Ana"


@pytest.mark.parametrize("text, expected", [
    ("contact.email", True), ("contact.nothing", False), ("not contact.nothing", True),
    ("lead-status.label == Hot", True), ("lead-status.label == Cold", False), ("lead-status.label != Cold", True),
    ("fields.Country in US, CA", True), ("fields.Country in FR, DE", False), ("fields.Country not in FR", True),
    ("fields.Country == 'US'", True),
])
def test_only_if_conditions(text, expected):
    event = listener.Event(1, None, "t", "POST", listener.parse_form(
        b"contact[email]=a@b.c&lead-status[label]=Hot&fields[0][name]=Country&fields[0][value]=US"))
    assert listener.Condition(text)(event) is expected


# --- Running handlers and recording deliveries -----------------------------------------------

RAISES = "def handle(event, settings):\n    raise ValueError('the CRM said no\\nsecond line')\n"
HANGS = "import time\ndef handle(event, settings):\n    time.sleep(30)\n"
RECORDS = ("import json, os\ndef handle(event, settings):\n"
           "    with open(os.path.join(settings.folder, 'seen.txt'), 'a') as f:\n"
           "        f.write('%s %s\\n' % (settings.name, event.id))\n")


def test_handler_that_raises_fails_only_its_delivery(tmp_path, own_handlers):
    own_handlers("boom", RAISES)
    own_handlers("records", RECORDS)
    site = handler_site(tmp_path, "boom, records")
    answer = site.post(b"transactionid=1&contact[email]=a@b.c").json
    assert answer == {"ok": True, "event_id": 1, "duplicate": False}
    rows = deliveries(site)
    assert [(r["handler"], r["status"], r["attempts"]) for r in rows] == [("boom", "failed", 1), ("records", "done", 1)]
    assert rows[0]["last_error"] == "ValueError: the CRM said no second line"
    assert "Traceback" in site.log_text() and "the CRM said no" in site.log_text()
    assert len(site.rows()) == 1
    assert open(str(tmp_path / "seen.txt")).read() == "records 1\n"


def test_handler_that_hangs_times_out_and_the_answer_comes(tmp_path, own_handlers):
    own_handlers("hangs", HANGS)
    own_handlers("records", RECORDS)
    site = handler_site(tmp_path, "hangs, records", hangs={"timeout": "0.5"})
    started = time.time()
    site.post(b"transactionid=1")
    assert time.time() - started < 5
    rows = deliveries(site)
    assert rows[0]["status"] == "failed" and rows[0]["last_error"] == "timed out after 0.5 s"
    assert rows[1]["status"] == "done"


def test_only_if_false_is_recorded_as_skipped(tmp_path, own_handlers):
    own_handlers("records", RECORDS)
    site = handler_site(tmp_path, "records", records={"only_if": "lead-status.label == Hot"})
    site.post(b"transactionid=1&lead-status[label]=Cold")
    site.post(b"transactionid=2&lead-status[label]=Hot")
    assert [(r["event_id"], r["status"], r["attempts"]) for r in deliveries(site)] == [(1, "skipped", 0), (2, "done", 1)]


def test_duplicate_event_runs_no_handler_again(tmp_path, own_handlers):
    own_handlers("records", RECORDS)
    site = handler_site(tmp_path, "records")
    site.post(b"transactionid=1")
    site.post(b"transactionid=1")
    assert open(str(tmp_path / "seen.txt")).read() == "records 1\n"


def test_deferred_handler_waits_for_deliver(tmp_path, own_handlers):
    own_handlers("records", RECORDS)
    site = handler_site(tmp_path, "records", run="deferred")
    site.post(b"transactionid=1")
    assert deliveries(site)[0]["status"] == "pending" and not (tmp_path / "seen.txt").exists()
    config = site.config
    claimed, claim = listener.claim_deliveries(listener.connect(config), config, "pending")
    listener.run_claimed(listener.connect(config), config, claimed, claim, print)
    assert deliveries(site)[0]["status"] == "done"
    assert open(str(tmp_path / "seen.txt")).read() == "records 1\n"


def test_respond_with_adds_handler_results_to_the_answer(tmp_path, own_handlers):
    own_handlers("crm", "def handle(event, settings):\n    return {'id': 'C-%d' % event.id, 'token': 'x' * 999}\n")
    site = handler_site(tmp_path, "crm", {"respond_with": "crm.id"})
    answer = site.post(b"transactionid=1").json
    assert answer == {"ok": True, "event_id": 1, "duplicate": False, "crm": {"id": "C-1"}}


def test_deliver_run_twice_at_once_delivers_each_event_once(tmp_path):
    script = tmp_path / "slow.py"
    script.write_text("import sys, json, time\ne = json.load(sys.stdin)\ntime.sleep(0.05)\n"
                      "open(%r, 'a').write('%%s\\n' %% e['id'])\n" % str(tmp_path / "delivered.txt"))
    site = handler_site(tmp_path, "cmd", run="deferred",
                        cmd={"module": "command", "command": "%s %s" % (sys.executable, script)})
    for i in range(30):
        site.post(b"transactionid=%d" % i)
    env = dict(os.environ)
    env.pop("GATEWAY_INTERFACE", None)
    runs = [subprocess.Popen([sys.executable, LISTENER, "--config", site.config_path, "deliver"], env=env)
            for _ in range(2)]
    assert [p.wait(120) for p in runs] == [0, 0]
    delivered = open(str(tmp_path / "delivered.txt")).read().split()
    assert sorted(delivered, key=int) == [str(i) for i in range(1, 31)]
    assert {r["status"] for r in deliveries(site)} == {"done"}


def test_retry_backs_off_gives_up_and_never_reruns_a_success(tmp_path):
    flag = tmp_path / "fail"
    flag.write_text("")
    script = tmp_path / "flaky.py"
    script.write_text("import os, sys\nif os.path.exists(%r):\n    sys.stderr.write('warming up\\nCRM is down\\n')\n"
                      "    sys.exit(3)\nopen(%r, 'a').write('ok\\n')\n" % (str(flag), str(tmp_path / "ok.txt")))
    site = handler_site(tmp_path, "cmd", retry_delay="1", max_attempts="3",
                        cmd={"module": "command", "command": "%s %s" % (sys.executable, script)})
    site.post(b"transactionid=1")
    row = deliveries(site)[0]
    assert row["status"] == "failed" and row["last_error"] == "RuntimeError: exit status 3: CRM is down"
    result = cli(site, "retry")  # not due yet: the first retry waits retry_delay
    assert result.returncode == 1 and "event 1 cmd: failed 1 time: RuntimeError" in result.stdout
    assert deliveries(site)[0]["attempts"] == 1
    time.sleep(1.1)
    assert cli(site, "retry").returncode == 1 and deliveries(site)[0]["attempts"] == 2
    next_at = site.rows("SELECT next_attempt_at, updated_at FROM deliveries")[0]
    assert next_at["next_attempt_at"] > next_at["updated_at"]  # 2 s later: twice the first wait
    flag.unlink()
    time.sleep(2.1)
    result = cli(site, "retry")
    assert result.returncode == 0 and result.stdout == ""  # silent on success
    assert deliveries(site)[0]["status"] == "done" and deliveries(site)[0]["attempts"] == 3
    time.sleep(1.1)
    assert cli(site, "retry").returncode == 0
    assert open(str(tmp_path / "ok.txt")).read() == "ok\n"  # a success is never re-run


def test_retry_stops_at_max_attempts(tmp_path):
    site = handler_site(tmp_path, "cmd", retry_delay="1", max_attempts="2",
                        cmd={"module": "command", "command": "%s -c 'import sys; sys.exit(1)'" % sys.executable})
    site.post(b"transactionid=1")
    time.sleep(1.1)
    cli(site, "retry")
    time.sleep(2.1)
    assert cli(site, "retry").returncode == 1
    assert deliveries(site)[0]["attempts"] == 2


def test_replay_reruns_one_event_on_purpose(tmp_path, own_handlers):
    own_handlers("records", RECORDS)
    site = handler_site(tmp_path, "records")
    site.post(b"transactionid=1")
    config = site.config
    conn = listener.connect(config)
    claimed, claim = listener.claim_deliveries(conn, config, "replay", 1)
    assert claimed == [(1, "records")]
    listener.run_claimed(conn, config, claimed, claim, print)
    assert open(str(tmp_path / "seen.txt")).read() == "records 1\nrecords 1\n"
    assert deliveries(site)[0]["attempts"] == 2


def test_replay_command_for_one_handler(tmp_path):
    site = handler_site(tmp_path, "jsonl, csv", jsonl={"path": "data/e.jsonl"})
    site.post(vbout_body(1))
    result = cli(site, "replay", "1", "--handler", "jsonl")
    assert result.returncode == 0 and "event 1 jsonl: done" in result.stdout
    assert len(open(str(tmp_path / "data" / "e.jsonl")).readlines()) == 2
    assert len(open(str(tmp_path / "data" / "contacts.csv")).readlines()) == 2  # header and one row
    assert cli(site, "replay", "99").returncode == 2


def test_event_as_json_is_as_dict_whether_the_payload_is_reused_or_encoded(tmp_path):
    site = handler_site(tmp_path, "jsonl", jsonl={"path": "data/e.jsonl"})
    site.post(b"transactionid=7&contact[email]=Andr%C3%A9@b.c&fields[0][name]=City&fields[0][value]=S%C3%A3o")
    assert cli(site, "replay", "1", "--handler", "jsonl").returncode == 0
    inline, replayed = open(str(tmp_path / "data" / "e.jsonl"), encoding="utf-8").read().splitlines()
    assert inline == replayed  # the request's event and the one read back from the row
    tree = {"transactionid": "7", "contact": {"email": "André@b.c"}, "fields": [{"name": "City", "value": "São"}]}
    assert json.loads(inline) == {"id": 1, "transaction_id": "7", "received_at": json.loads(inline)["received_at"],
                                  "method": "POST", "data": tree}
    event = listener.Event(1, "7", json.loads(inline)["received_at"], "POST", tree)  # no stored payload
    assert event.as_json() == inline and json.loads(event.as_json()) == event.as_dict()
    stored = listener.Event(1, "7", "t", "POST", tree, payload='{"kept": "as stored"}')
    assert json.loads(stored.as_json())["data"] == {"kept": "as stored"}  # the stored text, not encoded again


def test_spooled_event_gets_pending_deliveries(tmp_path, own_handlers):
    own_handlers("records", RECORDS)
    site = handler_site(tmp_path, "records")
    config = site.config
    row = listener._event_row({"transactionid": "s"}, b"transactionid=s", "POST", None, "127.0.0.1")
    listener.spool_append(config, row)
    listener.spool_import(config)
    assert deliveries(site)[0]["status"] == "pending"


def test_schema_migrates_from_version_1(tmp_path):
    path = str(tmp_path / "old.sqlite3")
    conn = sqlite3.connect(path, isolation_level=None)
    for statement in listener.MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute("PRAGMA user_version=1")
    conn.execute("INSERT INTO events (received_at, method, payload) VALUES ('t', 'POST', '{}')")
    conn.close()
    listener.migrate(sqlite3.connect(path, isolation_level=None))
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(listener.MIGRATIONS)
    assert "claimed_by" in [r[1] for r in conn.execute("PRAGMA table_info(deliveries)")]
    assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 1


# --- contacts ------------------------------------------------------------------------------

def test_contacts_handler_keeps_contacts_fields_activities_and_status(tmp_path):
    site = handler_site(tmp_path, "contacts")
    site.post(vbout_body(1))
    site.post(vbout_body(2))
    later = vbout_body(1).replace(b"transactionid=123456790", b"transactionid=later").replace(
        b"Value+0+for+contact+1", b"Changed").replace(b"lead-status%5Blabel%5D=Hot", b"lead-status%5Blabel%5D=Warm")
    site.post(later)
    contacts = site.rows("SELECT * FROM contacts ORDER BY contact_key")
    assert [c["contact_key"] for c in contacts] == ["id:5001", "id:5002"]
    assert contacts[0]["email"] == "contact1@example.com" and contacts[0]["last_event_id"] == 3
    assert contacts[0]["first_seen"] < contacts[0]["last_seen"]
    fields = site.rows("SELECT name, value FROM contact_fields WHERE contact_key = 'id:5001' ORDER BY field_id")
    assert len(fields) == 10 and fields[0] == {"name": "First Name", "value": "Changed"}
    kinds = site.rows("SELECT kind, count(*) AS n FROM activities WHERE contact_key = 'id:5001' GROUP BY kind")
    assert {k["kind"]: k["n"] for k in kinds} == {
        "campaign_opened": 2, "link_clicked": 2, "page_visited": 2, "automation_triggered": 2,
        "goal_reached": 2, "webhook_triggered": 2, "lead_score": 2}
    statuses = site.rows("SELECT label FROM lead_status WHERE contact_key = 'id:5001' ORDER BY seen_at")
    assert [s["label"] for s in statuses] == ["Hot", "Warm"]
    before = {t: site.rows("SELECT * FROM %s" % t) for t in ("contacts", "contact_fields", "activities", "lead_status")}
    assert cli(site, "replay", "1").returncode == 0  # an older event, replayed: nothing changes
    assert cli(site, "replay", "3").returncode == 0
    assert {t: site.rows("SELECT * FROM %s" % t) for t in before} == before


def test_contacts_handler_keys_by_email_without_id_and_can_use_another_file(tmp_path):
    site = handler_site(tmp_path, "contacts", contacts={"database": "data/crm.sqlite3"})
    site.app.get(site.url("email=Ana%40Example.com&name=Ana"), status=200)
    conn = sqlite3.connect(str(tmp_path / "data" / "crm.sqlite3"))
    assert conn.execute("SELECT contact_key, email FROM contacts").fetchall() == [("email:ana@example.com",
                                                                                   "Ana@Example.com")]
    assert oct(os.stat(str(tmp_path / "data" / "crm.sqlite3")).st_mode & 0o777) == "0o600"


# --- forward -------------------------------------------------------------------------------

class Peer:
    """A real HTTP server on 127.0.0.1 that records requests and answers as told."""

    def __init__(self):
        self.requests, self.answers, self.delay = [], [], 0
        peer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}  # names are case-insensitive
                peer.requests.append({"method": self.command, "path": self.path, "headers": headers,
                                      "body": body})
                time.sleep(peer.delay)
                status, answer = peer.answers.pop(0) if peer.answers else (200, b'{"id": "crm-7"}')
                self.send_response(status)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)
            do_PUT = do_POST

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = "http://127.0.0.1:%d/contacts" % self.server.server_port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def peer():
    p = Peer()
    yield p
    p.close()


def test_forward_sends_mapped_json_with_headers_and_signature(tmp_path, peer, monkeypatch):
    monkeypatch.setenv("CRM_TOKEN", "tok-123")
    secret = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
    site = handler_site(tmp_path, "crm", {"respond_with": "crm.id"}, crm={
        "module": "forward", "url": peer.url, "map": "email = contact.email\nfirst_name = fields.First Name",
        "static": "source = vbout", "headers": "Authorization: Bearer ${CRM_TOKEN}", "signing_secret": secret})
    answer = site.post(vbout_body(4)).json
    assert answer["crm"] == {"id": "crm-7"}
    (request,) = peer.requests
    assert request["method"] == "POST" and request["headers"]["content-type"] == "application/json"
    assert json.loads(request["body"]) == {"email": "contact4@example.com", "first_name": "Value 0 for contact 4",
                                           "source": "vbout"}
    assert request["headers"]["authorization"] == "Bearer tok-123"
    headers = request["headers"]
    assert headers["webhook-id"] == "1"
    signed = ("%s.%s." % (headers["webhook-id"], headers["webhook-timestamp"])).encode() + request["body"]
    expected = base64.b64encode(hmac.new(b"0123456789abcdef0123456789abcdef", signed, hashlib.sha256).digest())
    assert headers["webhook-signature"] == "v1," + expected.decode()
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60
    assert "tok-123" not in site.log_text()


def test_forward_sends_the_whole_event_as_a_php_form(tmp_path, peer):
    site = handler_site(tmp_path, "crm", crm={"module": "forward", "url": peer.url, "format": "form", "method": "PUT"})
    body = vbout_body(5)
    site.post(body)
    (request,) = peer.requests
    assert request["method"] == "PUT"
    sent = listener.parse_form(request["body"])
    assert sent["event_id"] == "1" and sent["data"] == listener.parse_form(body)


def test_forward_failure_then_success_across_retry(tmp_path, peer):
    peer.answers = [(500, b"<html>Internal   Server\nError</html>" + b"x" * 500)]
    site = handler_site(tmp_path, "crm", retry_delay="1", crm={"module": "forward", "url": peer.url})
    site.post(b"transactionid=1")
    row = deliveries(site)[0]
    assert row["status"] == "failed"
    assert row["last_error"].startswith("RuntimeError: HTTP 500 from the API: <html>Internal Server Error</html>xxx")
    assert len(row["last_error"]) < 260
    time.sleep(1.1)
    assert cli(site, "retry").returncode == 0
    assert deliveries(site)[0]["status"] == "done" and len(peer.requests) == 2


def test_forward_hanging_api_hits_the_timeout(tmp_path, peer):
    peer.delay = 5
    site = handler_site(tmp_path, "crm", crm={"module": "forward", "url": peer.url, "timeout": "0.5"})
    started = time.time()
    site.post(b"transactionid=1")
    assert time.time() - started < 4
    assert deliveries(site)[0]["status"] == "failed"
    assert "timed out" in deliveries(site)[0]["last_error"]


def test_forward_ignores_proxy_environment(tmp_path, peer, monkeypatch):
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens there: using it would fail
    monkeypatch.setenv("NO_PROXY", "")
    site = handler_site(tmp_path, "crm", crm={"module": "forward", "url": peer.url})
    site.post(b"transactionid=1")
    assert deliveries(site)[0]["status"] == "done" and len(peer.requests) == 1


def test_forward_uses_a_configured_proxy(tmp_path, peer):
    site = handler_site(tmp_path, "crm", crm={"module": "forward", "url": "http://vbout-crm.invalid/contacts",
                                              "proxy": "http://127.0.0.1:%d" % peer.server.server_port})
    site.post(b"transactionid=1")
    assert deliveries(site)[0]["status"] == "done"
    assert peer.requests[0]["path"] == "http://vbout-crm.invalid/contacts"  # asked of the proxy


# --- jsonl and csv -------------------------------------------------------------------------

def test_jsonl_handler_appends_privately_and_rotates(tmp_path):
    site = handler_site(tmp_path, "jsonl", jsonl={"path": "out/events.jsonl", "max_bytes": "1500", "keep": "2"})
    for i in range(6):
        site.post(b"transactionid=%d&contact[email]=a%d@b.c&pad=%s" % (i, i, b"x" * 400))
    path = tmp_path / "out" / "events.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[-1]["transaction_id"] == "5" and lines[-1]["data"]["contact"]["email"] == "a5@b.c"
    assert (tmp_path / "out" / "events.jsonl.1").exists() and (tmp_path / "out" / "events.jsonl.2").exists()
    assert not (tmp_path / "out" / "events.jsonl.3").exists()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    total = sum(len(p.read_text().splitlines()) for p in (tmp_path / "out").glob("events.jsonl*") if "lock" not in p.name)
    assert total <= 6 and total >= 4


def test_csv_handler_writes_header_once_and_is_excel_safe(tmp_path):
    site = handler_site(tmp_path, "csv", csv={"path": "data/c.csv", "columns": "Email = contact.email\n"
                                              "First = fields.First Name\nEvent = event.id"})
    site.post(b"transactionid=1&contact[email]=a@b.c&fields[0][name]=First+Name&fields[0][value]=%3DHYPERLINK(1)")
    site.post(b"transactionid=2&contact[email]=d@e.f&fields[0][name]=First+Name&fields[0][value]=Ana%2C+Jr")
    assert (tmp_path / "data" / "c.csv").read_bytes().decode() == (
        "Email,First,Event\r\na@b.c,'=HYPERLINK(1),1\r\nd@e.f,\"Ana, Jr\",2\r\n")


# --- email ---------------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_email_handler_sends_through_a_real_smtp_conversation(tmp_path, monkeypatch):
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult, LoginPassword

    received = []

    class Collect:
        async def handle_DATA(self, server, session, envelope):
            received.append((envelope.mail_from, envelope.rcpt_tos, envelope.content.decode(), session.authenticated))
            return "250 OK"

    def authenticator(server, session, envelope, mechanism, data):
        ok = isinstance(data, LoginPassword) and data.login == b"me" and data.password == b"s3cret"
        return AuthResult(success=ok)

    port = free_port()
    controller = Controller(Collect(), hostname="127.0.0.1", port=port, authenticator=authenticator,
                            auth_require_tls=False)
    controller.start()
    try:
        monkeypatch.setenv("SMTP_PASSWORD", "s3cret")
        site = handler_site(tmp_path, "mail", mail={
            "module": "email", "host": "127.0.0.1", "port": str(port), "security": "none", "user": "me",
            "password_env": "SMTP_PASSWORD", "from": "listener@example.com", "to": "sales@example.com, me@example.com",
            "subject": "Hot lead: {contact.email}\nBcc: evil@example.com", "body": "Name: {fields.First Name}\n\n{{literal}}"})
        site.post(b"transactionid=1&contact[email]=ana@example.com&fields[0][name]=First+Name&fields[0][value]=Ana")
    finally:
        controller.stop()
    assert deliveries(site)[0]["status"] == "done"
    (mail_from, rcpt, content, authenticated) = received[0]
    assert mail_from == "listener@example.com" and rcpt == ["sales@example.com", "me@example.com"]
    assert authenticated
    assert "Subject: Hot lead: ana@example.com Bcc: evil@example.com" in content
    assert "\nBcc:" not in content.split("\n\n")[0]
    assert "Name: Ana\n\n{literal}" in content.replace("\r\n", "\n")


@pytest.mark.parametrize("security", ["starttls", "ssl"])
def test_email_handler_over_tls(tmp_path, security):
    """STARTTLS and SSL against a real SMTP server with a certificate of its own (trusted through ca_file)."""
    import shutil
    import ssl
    if not shutil.which("openssl"):
        pytest.skip("openssl is needed to make a test certificate")
    from aiosmtpd.controller import Controller
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(str(cert), str(key))
    received = []

    class Collect:
        async def handle_DATA(self, server, session, envelope):
            received.append((envelope.content.decode(), session.ssl is not None))
            return "250 OK"

    port = free_port()
    if security == "starttls":
        controller = Controller(Collect(), hostname="127.0.0.1", port=port, tls_context=server_context,
                                require_starttls=True)
    else:
        controller = Controller(Collect(), hostname="127.0.0.1", port=port, ssl_context=server_context)
    controller.start()
    try:
        site = handler_site(tmp_path, "mail", mail={
            "module": "email", "host": "127.0.0.1", "port": str(port), "security": security, "ca_file": str(cert),
            "from": "listener@example.com", "to": "sales@example.com"})
        site.post(b"transactionid=1&contact[email]=ana@example.com")
        (tmp_path / "untrusted").mkdir()
        untrusted = handler_site(tmp_path / "untrusted", "mail", mail={"module": "email", "host": "127.0.0.1", "port": str(port),
                                               "security": security, "from": "a@b.c", "to": "d@e.f"})
        untrusted.post(b"transactionid=2")
    finally:
        controller.stop()
    assert deliveries(site)[0]["status"] == "done"
    assert len(received) == 1 and "ana@example.com" in received[0][0]
    assert received[0][1] is True or security == "ssl"  # STARTTLS upgraded; on the SSL port all is TLS
    failed = deliveries(untrusted)[0]
    assert failed["status"] == "failed" and "CERTIFICATE_VERIFY_FAILED" in failed["last_error"]  # verification stays on


def test_email_handler_failure_is_recorded(tmp_path):
    site = handler_site(tmp_path, "mail", mail={"module": "email", "host": "127.0.0.1", "port": str(free_port()),
                                                "security": "none", "from": "a@b.c", "to": "d@e.f"})
    site.post(b"transactionid=1")
    row = deliveries(site)[0]
    assert row["status"] == "failed" and "ConnectionRefusedError" in row["last_error"]


def test_email_handler_needs_its_addresses(tmp_path):
    assert "[handler:email] to: '' is not a list of email addresses" in config_error(
        tmp_path, "[handlers]\nenabled = email\n[handler:email]\nfrom = a@b.c\n")


# --- command -------------------------------------------------------------------------------

def test_command_handler_gets_the_event_on_stdin_and_returns_its_json(tmp_path, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", "http://evil:1")  # under CGI, a request's Proxy: header
    script = tmp_path / "on_contact.py"
    script.write_text("import json, os, sys\ne = json.load(sys.stdin)\n"
                      "print(json.dumps({'crm_id': 'X' + e['data']['contact']['email'], 'proxy': os.environ.get('HTTP_PROXY')}))\n")
    site = handler_site(tmp_path, "cmd", {"respond_with": "cmd.crm_id"},
                        cmd={"module": "command", "command": "%s %s" % (sys.executable, script)})
    answer = site.post(b"transactionid=1&contact[email]=a@b.c").json
    assert answer["cmd"] == {"crm_id": "Xa@b.c"}
    assert json.loads(deliveries(site)[0]["result"]) == {"crm_id": "Xa@b.c", "proxy": None}


def test_command_handler_failure_and_timeout(tmp_path):
    site = handler_site(tmp_path, "bad, slow", slow={"module": "command", "timeout": "0.5",
                                                     "command": "%s -c 'import time; time.sleep(10)'" % sys.executable},
                        bad={"module": "command", "command": "%s -c 'import sys; sys.stderr.write(\"oops\\n\"); sys.exit(4)'"
                             % sys.executable})
    site.post(b"transactionid=1")
    rows = {r["handler"]: r for r in deliveries(site)}
    assert rows["bad"]["last_error"] == "RuntimeError: exit status 4: oops"
    assert rows["slow"]["status"] == "failed" and "0.5 s" in rows["slow"]["last_error"]


def test_every_shipped_handler_has_tests():
    names = [f[:-3] for f in os.listdir(os.path.join(ROOT, "handlers")) if f.endswith(".py") and f != "__init__.py"]
    tests = [name for name in globals() if name.startswith("test_")]
    for name in names:
        assert any(t.startswith("test_%s_" % name) for t in tests), name


def test_inline_outcome_record_leaves_the_connection_durable(tmp_path, own_handlers):
    own_handlers("records", RECORDS)
    site = handler_site(tmp_path, "records")
    site.post(b"transactionid=1")
    assert listener.connect(site.config).execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL again
    assert deliveries(site)[0]["status"] == "done"


def test_contacts_handler_waits_for_the_disk_only_in_a_file_of_its_own(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for folder, sections, expected in (("a", {}, 1), ("b", {"contacts": {"database": "data/crm.sqlite3"}}, 2)):
        site = handler_site(tmp_path / folder, "contacts", **sections)
        site.post(vbout_body(1))  # the handler opens its connection in this (the request's) thread
        handler = site.config.handler("contacts")
        key = (handler.options["database"], handler.options["synchronous"])
        conn = handler.module._local.connections[key][0]  # the connection the request wrote with
        # 1 NORMAL: ordered with the delivery record by the events database's WAL; 2 FULL in a file of its own
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == expected


def test_retry_run_twice_at_once_retries_each_delivery_once(tmp_path):
    script = tmp_path / "count.py"
    script.write_text("import sys, json, time\ne = json.load(sys.stdin)\nopen(%r, 'a').write('%%s\\n' %% e['id'])\n"
                      "time.sleep(0.05)\nsys.exit(1)\n" % str(tmp_path / "tries.txt"))
    site = handler_site(tmp_path, "cmd", retry_delay="1", cmd={"module": "command", "command": "%s %s" % (
        sys.executable, script)})
    for i in range(12):
        site.post(b"transactionid=%d" % i)
    (tmp_path / "tries.txt").write_text("")
    time.sleep(1.1)
    env = dict(os.environ)
    env.pop("GATEWAY_INTERFACE", None)
    runs = [subprocess.Popen([sys.executable, LISTENER, "--config", site.config_path, "retry"], env=env,
                             stdout=subprocess.DEVNULL) for _ in range(2)]
    codes = [p.wait(120) for p in runs]
    assert 1 in codes and set(codes) <= {0, 1}  # the run that retried them reports them still failing
    tries = (tmp_path / "tries.txt").read_text().split()
    assert sorted(tries, key=int) == [str(i) for i in range(1, 13)]  # each retried once, by one of the two
    assert {r["attempts"] for r in deliveries(site)} == {2}
