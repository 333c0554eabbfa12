"""Storage: schema, private files, durability settings, concurrency, the spool when SQLite cannot take an event."""

import json
import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time

import listener
from conftest import ROOT, SECRET, vbout_body

POSTER = textwrap.dedent("""
    import io, json, sys
    sys.path.insert(0, %r)
    import listener
    config, worker, count, repeat = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    answers = []
    for i in range(count):
        tid = "w%%d-%%d" %% (worker, i) if not repeat else "shared-%%d" %% i
        body = ("transactionid=%%s&contact[email]=c%%d@x.y&fields[0][value]=%%d" %% (tid, i, i)).encode()
        environ = {"REQUEST_METHOD": "POST", "QUERY_STRING": "key=%s", "CONTENT_LENGTH": str(len(body)),
                   "CONTENT_TYPE": "application/x-www-form-urlencoded", "wsgi.input": io.BytesIO(body),
                   "wsgi.errors": sys.stderr, "VBOUT_LISTENER_CONFIG": config}
        status = []
        out = b"".join(listener.application(environ, lambda s, h, e=None: status.append(s)))
        answers.append([status[0], json.loads(out)])
    print(json.dumps(answers))
""") % (ROOT, SECRET)


def test_schema_is_versioned_and_has_both_tables(site):
    site.post(b"a=1")
    conn = sqlite3.connect(site.config.database)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(listener.MIGRATIONS)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"events", "deliveries"} <= tables
    columns = [r[1] for r in conn.execute("PRAGMA table_info(events)")]
    for name in ("id", "transaction_id", "received_at", "method", "content_type", "remote_addr", "payload",
                 "raw_body", "contact_email", "contact_id"):
        assert name in columns
    columns = [r[1] for r in conn.execute("PRAGMA table_info(deliveries)")]
    assert columns[:6] == ["event_id", "handler", "status", "attempts", "last_error", "updated_at"]
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_newer_schema_is_refused_not_downgraded(site):
    site.post(b"a=1")
    conn = sqlite3.connect(site.config.database)
    conn.execute("PRAGMA user_version=99")
    conn.close()
    listener._connections.by_path = {}
    answer = site.post(b"a=2").json
    assert answer["spooled"] is True  # kept in the spool, not written into a schema we do not know


def test_database_and_folder_are_private(site):
    site.post(b"a=1")
    database = site.config.database
    assert stat.S_IMODE(os.stat(os.path.dirname(database)).st_mode) == 0o700
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(database + suffix):
            assert stat.S_IMODE(os.stat(database + suffix).st_mode) == 0o600, suffix


def test_durability_setting_reaches_sqlite(site):
    conn = listener.connect(site.config)
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    site.reconfigure(durability="normal", database="data/normal.sqlite3")
    conn = listener.connect(site.config)
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL


def test_kept_connection_notices_its_file_replaced(site):
    site.post(b"transactionid=1")
    database = site.config.database
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(database + suffix):
            os.remove(database + suffix)
    answer = site.post(b"transactionid=2").json
    assert answer == {"ok": True, "event_id": 1, "duplicate": False}
    assert [r["transaction_id"] for r in site.rows()] == ["2"]  # in the new file, not a deleted one


def test_connections_are_per_thread(site):
    import threading
    seen = []
    thread = threading.Thread(target=lambda: seen.append(listener.connect(site.config)))
    thread.start()
    thread.join()
    assert seen[0] is not listener.connect(site.config)
    assert listener.connect(site.config) is listener.connect(site.config)


def run_posters(site, workers, count, repeat):
    procs = [subprocess.Popen([sys.executable, "-c", POSTER, site.config_path, str(w), str(count), str(int(repeat))],
                              stdout=subprocess.PIPE) for w in range(workers)]
    answers = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        answers += json.loads(out)
    return answers


def test_several_processes_posting_at_once_lose_nothing(site):
    answers = run_posters(site, workers=6, count=40, repeat=False)
    assert all(status.startswith("200") for status, _ in answers)
    assert not any(a.get("spooled") for _, a in answers), site.log_text()
    rows = site.rows()
    assert len(rows) == 240 and len({r["transaction_id"] for r in rows}) == 240


def test_several_processes_sending_the_same_ids_store_each_once(site):
    answers = run_posters(site, workers=6, count=30, repeat=True)
    assert all(status.startswith("200") for status, _ in answers)
    rows = site.rows()
    assert sorted(r["transaction_id"] for r in rows) == sorted("shared-%d" % i for i in range(30))
    assert sum(1 for _, a in answers if not a["duplicate"]) == 30


def hold_lock(path, seconds, begin="BEGIN IMMEDIATE"):
    """Another connection holds a write lock on path for seconds, in a thread; returns the thread once it holds it."""
    import threading
    holding = threading.Event()

    def hold():
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute(begin)
        holding.set()
        time.sleep(seconds)
        conn.execute("COMMIT")
        conn.close()

    thread = threading.Thread(target=hold)
    thread.start()
    holding.wait(10)
    return thread


def test_a_writer_waits_out_a_lock_shorter_than_the_busy_timeout(site):
    site.post(b"transactionid=before")
    holder = hold_lock(site.config.database, 20 * listener.LOCK_LOOK)  # many of SQLite's own short waits
    answer = site.post(b"transactionid=during").json
    holder.join()
    assert answer == {"ok": True, "event_id": 2, "duplicate": False}


def test_a_database_being_made_by_another_process_is_waited_for(site):
    # What a second process meets while the first makes the file: a journal that is not WAL yet and
    # a lock on it. Preparing the file is retried like a write, not given up after one look.
    database = site.config.database
    os.makedirs(os.path.dirname(database), mode=0o700)
    os.close(os.open(database, os.O_WRONLY | os.O_CREAT, 0o600))
    holder = hold_lock(database, 20 * listener.LOCK_LOOK, begin="BEGIN EXCLUSIVE")
    answer = site.post(b"transactionid=first").json
    holder.join()
    assert answer == {"ok": True, "event_id": 1, "duplicate": False}


def test_locked_database_spools_and_imports_once(site):
    site.reconfigure(busy_timeout="0.2")
    site.post(b"transactionid=before")
    holder = sqlite3.connect(site.config.database, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another writer holds the lock past the timeout
    try:
        answer = site.post(vbout_body(3)).json
        assert answer == {"ok": True, "event_id": None, "duplicate": False, "spooled": True}
        assert os.path.getsize(site.config.spool_file) > 0
        assert stat.S_IMODE(os.stat(site.config.spool_file).st_mode) == 0o600
        assert "spooled" in site.log_text()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    later = site.post(b"transactionid=after").json  # a healthy database: the spool comes in first
    assert later["duplicate"] is False
    rows = site.rows()
    assert sorted(r["transaction_id"] for r in rows) == ["123456792", "after", "before"]
    spooled = [r for r in rows if r["transaction_id"] == "123456792"][0]
    assert spooled["raw_body"] == vbout_body(3)
    assert json.loads(spooled["payload"]) == listener.parse_form(vbout_body(3))
    assert os.path.getsize(site.config.spool_file) == 0
    assert listener.spool_import(site.config) == (0, 0, 0)
    assert len(site.rows()) == 3


def test_spool_import_after_a_crash_adds_nothing_twice(site):
    row = listener._event_row({"transactionid": "x"}, b"transactionid=x", "POST", None, "127.0.0.1")
    listener.spool_append(site.config, row)
    saved = open(site.config.spool_file, "rb").read()
    assert listener.spool_import(site.config) == (1, 0, 0)
    with open(site.config.spool_file, "wb") as f:  # as if the process died before truncating
        f.write(saved + b'{"torn": \n')
    assert listener.spool_import(site.config) == (0, 1, 1)
    assert len(site.rows()) == 1
    assert open(site.config.spool_file + ".bad", "rb").read() == b'{"torn": \n'


def test_spool_keeps_events_without_transaction_id_apart(site):
    for body in (b"a=1", b"a=1"):
        row = listener._event_row(listener.parse_form(body), body, "POST", None, "127.0.0.1")
        listener.spool_append(site.config, row)
    assert listener.spool_import(site.config) == (2, 0, 0)


def test_both_database_and_spool_failing_is_503(site, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    site.reconfigure(database=str(blocker / "events.sqlite3"), spool_file=str(blocker / "spool.jsonl"))
    answer = site.post(b"transactionid=1", status=503).json
    assert answer == {"ok": False, "error": "The event could not be stored; try again later.", "status": 503}
    assert str(tmp_path) not in json.dumps(answer)


def test_too_old_sqlite_spools_with_a_clear_message(site, monkeypatch):
    monkeypatch.setattr(listener, "SQLITE_MINIMUM", (99, 0, 0))
    listener._connections.by_path = {}
    assert site.post(b"transactionid=old").json["spooled"] is True
    assert "is too old (the listener needs 99.0.0 or newer)" in site.log_text()


def test_python_without_sqlite3_spools_instead_of_failing(site, monkeypatch):
    monkeypatch.setitem(sys.modules, "sqlite3", None)  # `import sqlite3` now raises ImportError
    listener._connections.by_path = {}
    assert site.post(b"transactionid=nosqlite").json == {"ok": True, "event_id": None, "duplicate": False,
                                                        "spooled": True}
    assert "this Python has no sqlite3 module" in site.log_text()
    monkeypatch.undo()
    listener._connections.by_path = {}
    site.post(b"transactionid=later")  # a healthy database again: the spooled event comes in
    assert sorted(r["transaction_id"] for r in site.rows()) == ["later", "nosqlite"]
