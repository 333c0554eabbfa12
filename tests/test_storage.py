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
from conftest import ROOT, SECRET, call, vbout_body

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


class LockHolder:
    """Another connection holding a write lock on a database until release() is called."""

    def __init__(self, path, begin="BEGIN IMMEDIATE"):
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute(begin)
        self.released = False

    def release(self):
        if not self.released:
            self.released = True
            self.conn.execute("COMMIT")
            self.conn.close()


def hold_lock(path, seconds, begin="BEGIN IMMEDIATE"):
    """Another connection holds a write lock on path for seconds; returns the timer thread that releases it."""
    import threading
    timer = threading.Timer(seconds, LockHolder(path, begin).release)
    timer.start()
    return timer


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


# Group commit: requests of one process that store at the same moment share a transaction.

def in_threads(target, args_list):
    """Start target(*args) in a thread each; returns (threads, results) with results filled as they end."""
    import threading
    results = [None] * len(args_list)

    def run(i, args):
        try:
            results[i] = ("returned", target(*args))
        except BaseException as e:  # noqa: B902  (what a thread raised is the result under test)
            results[i] = ("raised", e)

    threads = [threading.Thread(target=run, args=(i, args), daemon=True) for i, args in enumerate(args_list)]
    return threads, results


def join_all(threads, seconds=10):
    deadline = time.monotonic() + seconds
    for thread in threads:
        thread.join(max(0, deadline - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads), "a request is still waiting"


def wait_until(check, seconds=10):
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.005)


def post_app(site, body):
    """One form POST straight through listener.application, from any thread: (status, answer)."""
    import io
    status, _, out = call({"REQUEST_METHOD": "POST", "QUERY_STRING": "key=" + SECRET,
                           "CONTENT_LENGTH": str(len(body)), "CONTENT_TYPE": "application/x-www-form-urlencoded",
                           "wsgi.input": io.BytesIO(body), "VBOUT_LISTENER_CONFIG": site.config_path})
    return status, json.loads(out)


def queue_behind_a_waiting_writer(site, target, args_list):
    """The first call writes (and waits for a lock held elsewhere); the others queue behind it.

    One event ('before') is stored first so that the database exists: the calls' events are
    numbered from 2. Returns (holder, threads, results) with every call started and all but the
    first queued."""
    site.post(b"transactionid=before")
    writer = listener._writer(site.config.database)
    holder = LockHolder(site.config.database)
    threads, results = in_threads(target, args_list)
    threads[0].start()
    wait_until(lambda: writer.busy and not writer.queue)  # the first call took its row and waits for the lock
    for thread in threads[1:]:
        thread.start()
    wait_until(lambda: len(writer.queue) == len(threads) - 1)
    return holder, threads, results


def test_rows_queued_while_one_is_written_share_the_next_transaction(site):
    config = site.config
    rows = [listener._event_row({"transactionid": "t%d" % i}, b"transactionid=t%d" % i, "POST", None, "127.0.0.1")
            for i in range(6)]
    holder, threads, results = queue_behind_a_waiting_writer(
        site, listener._writer(config.database).store, [(config, row, [], None) for row in rows])
    holder.release()
    join_all(threads)
    assert all(kind == "returned" for kind, _ in results), results
    outcomes = [value for _, value in results]
    # The first call wrote its row alone; the first of the queued ones wrote all five others.
    assert [wrote for _, wrote in outcomes].count(True) == 2
    assert outcomes[0][1] is True
    assert sorted(event_id for (event_id, _), _ in outcomes) == [2, 3, 4, 5, 6, 7]
    assert not any(duplicate for (_, duplicate), _ in outcomes)
    stored = {r["transaction_id"]: r["id"] for r in site.rows()}
    assert {("t%d" % i): outcomes[i][0][0] for i in range(6)} == {k: v for k, v in stored.items() if k != "before"}
    assert listener._writer(config.database).busy is False


def test_the_same_transactionid_twice_in_one_transaction_is_stored_once(site):
    bodies = [b"transactionid=first"] + [b"transactionid=again&n=%d" % i for i in range(4)]
    holder, threads, results = queue_behind_a_waiting_writer(site, post_app, [(site, body) for body in bodies])
    holder.release()
    join_all(threads)
    answers = [value[1] for _, value in results[1:]]
    assert all(value[0] == "200 OK" for _, value in results)
    assert sorted(a["duplicate"] for a in answers) == [False, True, True, True]
    assert len({a["event_id"] for a in answers}) == 1
    again = site.rows("SELECT * FROM events WHERE transaction_id = 'again'")
    assert len(again) == 1 and again[0]["repeats"] == 3


def test_a_failed_shared_transaction_spools_every_event_in_it(site):
    site.reconfigure(busy_timeout="0.3")
    bodies = [b"transactionid=s%d" % i for i in range(5)]
    holder, threads, results = queue_behind_a_waiting_writer(site, post_app, [(site, body) for body in bodies])
    try:
        join_all(threads)
    finally:
        holder.release()
    answers = [value[1] for _, value in results]
    assert all(value[0] == "200 OK" for _, value in results)
    assert all(a == {"ok": True, "event_id": None, "duplicate": False, "spooled": True} for a in answers)
    assert site.log_text().count("database unavailable, event spooled") == 5
    site.post(b"transactionid=after")  # the database works again: the spool comes in
    assert sorted(r["transaction_id"] for r in site.rows()) == ["after", "before", "s0", "s1", "s2", "s3", "s4"]


def test_an_interrupted_writer_leaves_no_request_waiting(site, monkeypatch):
    config = site.config
    rows = [listener._event_row({"transactionid": "i%d" % i}, b"", "POST", None, "127.0.0.1") for i in range(4)]
    writer = listener._writer(config.database)
    holder, threads, results = queue_behind_a_waiting_writer(
        site, writer.store, [(config, row, [], None) for row in rows])
    real = listener._insert_event

    def interrupted(conn, row, *args):
        if row["transaction_id"] == "i1":  # the queued rows' writer is stopped on its first row
            raise KeyboardInterrupt
        return real(conn, row, *args)

    monkeypatch.setattr(listener, "_insert_event", interrupted)
    holder.release()
    join_all(threads)
    assert results[0] == ("returned", ((2, False), True))
    raised = [value for kind, value in results[1:] if kind == "raised"]
    assert len(raised) == 3 and sum(isinstance(e, KeyboardInterrupt) for e in raised) == 1
    assert all("interrupted" in str(e) for e in raised if isinstance(e, listener.StorageError))
    assert sum(isinstance(e, listener.StorageError) for e in raised) == 2
    monkeypatch.undo()
    assert writer.busy is False
    assert writer.store(config, rows[1], [], None) == ((3, False), True)  # the next request writes again


def test_a_forked_process_has_its_own_request_ids_and_writers(site):
    site.post(b"transactionid=parent")
    assert listener._writers
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        try:
            os.write(write, json.dumps([next(listener._request_numbers), len(listener._writers)]).encode())
        finally:
            os._exit(0)
    os.close(write)
    child = json.loads(os.read(read, 1000))
    os.close(read)
    os.waitpid(pid, 0)
    assert child[1] == 0
    assert child[0] != next(listener._request_numbers)  # the same number in both without a new start
