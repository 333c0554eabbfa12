"""Keeps one row per Vbout contact, with its custom fields, activities and lead status, in SQLite.

Tables (in the events database unless `database` names another file):
- contacts: one row per contact, keyed by Vbout's contact id, else by email; the latest email,
  phone and profile_url; first_seen, last_seen.
- contact_fields: the latest value of each custom field of each contact.
- activities: campaign_opened, link_clicked, page_visited, automation_triggered, goal_reached,
  webhook_triggered and lead_score rows; a repeat adds no row.
- lead_status: each score and label a contact was seen with.
Replaying an event changes nothing, and an older event never overwrites newer values.
"""

import os
import sqlite3
import threading

LOCAL = True  # only local SQLite, bounded by its busy timeout: runs in the request's thread

SETTINGS = {
    "database": ("", "SQLite file for the contact tables; empty keeps them in the events database."),
}

# WITHOUT ROWID: each row lives in one b-tree (its key), not in a table plus a unique index.
SCHEMA = [
    """CREATE TABLE IF NOT EXISTS contacts (
        contact_key TEXT PRIMARY KEY,
        vbout_id TEXT,
        email TEXT,
        phone TEXT,
        profile_url TEXT,
        first_seen TEXT NOT NULL,
        last_seen TEXT NOT NULL,
        last_event_id INTEGER
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS contacts_email ON contacts (email)",
    """CREATE TABLE IF NOT EXISTS contact_fields (
        contact_key TEXT NOT NULL,
        field_key TEXT NOT NULL,
        field_id TEXT,
        name TEXT,
        value TEXT,
        updated_at TEXT NOT NULL,
        PRIMARY KEY (contact_key, field_key)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS activities (
        contact_key TEXT NOT NULL,
        kind TEXT NOT NULL,
        item_id TEXT NOT NULL DEFAULT '',
        name TEXT NOT NULL DEFAULT '',
        url TEXT NOT NULL DEFAULT '',
        date TEXT NOT NULL DEFAULT '',
        value TEXT NOT NULL DEFAULT '',
        event_id INTEGER,
        PRIMARY KEY (contact_key, kind, item_id, name, url, date, value)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS lead_status (
        contact_key TEXT NOT NULL,
        score TEXT NOT NULL DEFAULT '',
        label TEXT NOT NULL DEFAULT '',
        seen_at TEXT NOT NULL,
        event_id INTEGER,
        PRIMARY KEY (contact_key, seen_at, score, label)
    ) WITHOUT ROWID""",
]

# Event view -> (activity kind, the item's keys for item_id, name, url, date, value).
ACTIVITIES = [
    ("campaigns_opened", "campaign_opened", ("id", "name", None, "open_date", None)),
    ("links_clicked", "link_clicked", (None, None, "url", None, "clicks")),
    ("pages_visited", "page_visited", (None, None, "page", "visit_date", None)),
    ("automations_triggered", "automation_triggered", ("id", "name", None, "trigger_date", None)),
    ("goals_reached", "goal_reached", ("id", "name", None, "reach_date", None)),
    ("webhooks_triggered", "webhook_triggered", ("id", "name", None, "trigger_date", None)),
    ("lead_scores", "lead_score", ("id", "name", None, "score_date", "score")),
]

_local = threading.local()  # one connection per thread and file, never shared


def check(settings):
    path = settings.path("database") or settings.database
    # In the events database, a commit need not wait for the disk: WAL frames carry cumulative
    # checksums, so these rows can only be lost together with the (later, also unsynced) record
    # that this delivery was done; `deliver` then runs it again, and a replay changes nothing.
    # In a file of its own, nothing orders the two: there it waits for the disk (FULL).
    return {"database": path, "synchronous": "NORMAL" if path == settings.database else "FULL"}


def handle(event, options):
    contact = event.contact
    key = _text(contact["id"]) and "id:" + _text(contact["id"])
    key = key or (_text(contact["email"]) and "email:" + _text(contact["email"]).lower())
    if not key:
        return {"contact": None}  # nothing to key a contact on: the event itself stays stored
    conn = _connect(options["database"], options["synchronous"])
    seen = event.received_at
    conn.execute("BEGIN IMMEDIATE")
    try:
        new = _save_contact(conn, key, contact, seen, event.id)
        _save_fields(conn, key, event.fields, seen, new)
        rows = []
        for view, kind, keys in ACTIVITIES:
            for item in getattr(event, view):
                rows.append([key, kind] + [_text(item.get(k)) if k else "" for k in keys] + [event.id])
        conn.executemany("INSERT OR IGNORE INTO activities (contact_key, kind, item_id, name, url, date, value,"
                         " event_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        status = event.lead_status
        if status:
            conn.execute("INSERT OR IGNORE INTO lead_status (contact_key, score, label, seen_at, event_id)"
                         " VALUES (?, ?, ?, ?, ?)",
                         (key, _text(status.get("score")), _text(status.get("label")), seen, event.id))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return {"contact": key}


def _save_contact(conn, key, contact, seen, event_id):
    """Insert or update the contact's row; True when it is new."""
    values = (_text(contact["id"]), _text(contact["email"]), _text(contact["phone"]),
              _text(contact["profile_url"]))
    before = conn.total_changes
    conn.execute("INSERT OR IGNORE INTO contacts (contact_key, vbout_id, email, phone, profile_url, first_seen,"
                 " last_seen, last_event_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (key,) + values + (seen, seen, event_id))
    if conn.total_changes != before:
        return True
    first_seen, last_seen = conn.execute("SELECT first_seen, last_seen FROM contacts WHERE contact_key = ?",
                                         (key,)).fetchone()
    if seen < first_seen:
        conn.execute("UPDATE contacts SET first_seen = ? WHERE contact_key = ?", (seen, key))
    if seen >= last_seen:  # the latest event wins; an older one (a replay) changes nothing
        conn.execute("UPDATE contacts SET vbout_id = coalesce(nullif(?, ''), vbout_id),"
                     " email = coalesce(nullif(?, ''), email), phone = coalesce(nullif(?, ''), phone),"
                     " profile_url = coalesce(nullif(?, ''), profile_url), last_seen = ?, last_event_id = ?"
                     " WHERE contact_key = ?", values + (seen, event_id, key))
    return False


def _save_fields(conn, key, fields, seen, new_contact):
    """Each custom field's latest value: new ones inserted, older ones updated, newer ones left alone."""
    known = {} if new_contact else dict(conn.execute(
        "SELECT field_key, updated_at FROM contact_fields WHERE contact_key = ?", (key,)))
    inserts, updates = [], []
    for field in fields:
        field_id, name = _text(field.get("id")), _text(field.get("name"))
        if not (field_id or name):
            continue
        field_key = "id:" + field_id if field_id else "name:" + name
        value = _text(field.get("value"))
        if field_key not in known:
            inserts.append((key, field_key, field_id, name, value, seen))
            known[field_key] = seen
        elif seen >= known[field_key]:  # the latest event wins; a replayed older one changes nothing
            updates.append((field_id, name, value, seen, key, field_key))
    conn.executemany("INSERT INTO contact_fields (contact_key, field_key, field_id, name, value, updated_at)"
                     " VALUES (?, ?, ?, ?, ?, ?)", inserts)
    conn.executemany("UPDATE contact_fields SET field_id = ?, name = ?, value = ?, updated_at = ?"
                     " WHERE contact_key = ? AND field_key = ?", updates)


def _text(value):
    if value.__class__ is str:  # nearly always, from a form
        return value.strip()
    if value is None or isinstance(value, (dict, list)):
        return ""
    return str(value).strip()


def _connect(path, synchronous="FULL"):
    """This thread's connection to path, reopened when the file was replaced."""
    cache = getattr(_local, "connections", None)
    if cache is None:
        cache = _local.connections = {}
    try:
        st = os.stat(path)
        identity = (st.st_dev, st.st_ino)
    except FileNotFoundError:
        identity = None
    kept = cache.get((path, synchronous))
    if kept is not None and kept[1] == identity and identity is not None:
        return kept[0]
    if kept is not None:
        kept[0].close()
    if identity is None:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))  # private, and its -wal and -shm too
    conn = sqlite3.connect(path, timeout=10, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=%s" % synchronous)
    for statement in SCHEMA:
        conn.execute(statement)
    st = os.stat(path)
    cache[(path, synchronous)] = (conn, (st.st_dev, st.st_ino))
    return conn


def forget(email, options):
    """Erase a person from the contact tables (for `listener.py forget`): what was removed, as text."""
    conn = _connect(options["database"])
    conn.execute("PRAGMA secure_delete=ON")
    try:
        conn.execute("BEGIN IMMEDIATE")
        keys = [r[0] for r in conn.execute("SELECT contact_key FROM contacts WHERE lower(email) = ? OR contact_key = ?",
                                           (email.lower(), "email:" + email.lower()))]
        counts = _delete(conn, keys)
        conn.execute("COMMIT")
        _compact(conn)
    finally:
        conn.execute("PRAGMA secure_delete=OFF")
    return ["%d contact, %d fields, %d activities, %d lead statuses removed from %s" % (
        counts["contacts"], counts["contact_fields"], counts["activities"], counts["lead_status"], options["database"])]


def prune(older_than, options):
    """Remove contacts not seen since older_than (for `listener.py prune --contacts`): counts by table."""
    conn = _connect(options["database"])
    conn.execute("BEGIN IMMEDIATE")
    keys = [r[0] for r in conn.execute("SELECT contact_key FROM contacts WHERE last_seen < ?", (older_than,))]
    counts = _delete(conn, keys)
    conn.execute("COMMIT")
    _compact(conn)
    return counts


def _delete(conn, keys):
    counts = dict.fromkeys(("contacts", "contact_fields", "activities", "lead_status"), 0)
    for i in range(0, len(keys), 500):
        chunk = keys[i:i + 500]
        marks = ",".join("?" * len(chunk))
        for table in counts:
            counts[table] += conn.execute("DELETE FROM %s WHERE contact_key IN (%s)" % (table, marks), chunk).rowcount
    return counts


def _compact(conn):
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("VACUUM")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
