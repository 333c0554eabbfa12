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

SETTINGS = {
    "database": ("", "SQLite file for the contact tables; empty keeps them in the events database."),
}

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
    )""",
    "CREATE INDEX IF NOT EXISTS contacts_email ON contacts (email)",
    """CREATE TABLE IF NOT EXISTS contact_fields (
        contact_key TEXT NOT NULL,
        field_key TEXT NOT NULL,
        field_id TEXT,
        name TEXT,
        value TEXT,
        updated_at TEXT NOT NULL,
        PRIMARY KEY (contact_key, field_key)
    )""",
    """CREATE TABLE IF NOT EXISTS activities (
        id INTEGER PRIMARY KEY,
        contact_key TEXT NOT NULL,
        kind TEXT NOT NULL,
        item_id TEXT NOT NULL DEFAULT '',
        name TEXT NOT NULL DEFAULT '',
        url TEXT NOT NULL DEFAULT '',
        date TEXT NOT NULL DEFAULT '',
        value TEXT NOT NULL DEFAULT '',
        event_id INTEGER,
        UNIQUE (contact_key, kind, item_id, name, url, date, value)
    )""",
    "CREATE INDEX IF NOT EXISTS activities_kind ON activities (kind, date)",
    """CREATE TABLE IF NOT EXISTS lead_status (
        contact_key TEXT NOT NULL,
        score TEXT NOT NULL DEFAULT '',
        label TEXT NOT NULL DEFAULT '',
        seen_at TEXT NOT NULL,
        event_id INTEGER,
        UNIQUE (contact_key, score, label, seen_at)
    )""",
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
    return {"database": settings.path("database") or settings.database}


def handle(event, options):
    contact = event.contact
    key = _text(contact["id"]) and "id:" + _text(contact["id"])
    key = key or (_text(contact["email"]) and "email:" + _text(contact["email"]).lower())
    if not key:
        return {"contact": None}  # nothing to key a contact on: the event itself stays stored
    conn = _connect(options["database"])
    seen = event.received_at
    conn.execute("BEGIN IMMEDIATE")
    try:
        _save_contact(conn, key, contact, seen, event.id)
        for field in event.fields:
            field_id, name = _text(field.get("id")), _text(field.get("name"))
            field_key = "id:" + field_id if field_id else "name:" + name
            if field_id or name:
                _upsert(conn, "contact_fields", ("contact_key", "field_key"), (key, field_key),
                        {"field_id": field_id, "name": name, "value": _text(field.get("value"))}, seen)
        for view, kind, keys in ACTIVITIES:
            for item in getattr(event, view):
                values = [_text(item.get(k)) if k else "" for k in keys]
                conn.execute("INSERT OR IGNORE INTO activities (contact_key, kind, item_id, name, url, date,"
                             " value, event_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", [key, kind] + values + [event.id])
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
    row = conn.execute("SELECT first_seen, last_seen FROM contacts WHERE contact_key = ?", (key,)).fetchone()
    values = (_text(contact["id"]), _text(contact["email"]), _text(contact["phone"]),
              _text(contact["profile_url"]))
    if row is None:
        conn.execute("INSERT INTO contacts (contact_key, vbout_id, email, phone, profile_url, first_seen,"
                     " last_seen, last_event_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                     (key,) + values + (seen, seen, event_id))
        return
    if seen < row[0]:
        conn.execute("UPDATE contacts SET first_seen = ? WHERE contact_key = ?", (seen, key))
    if seen >= row[1]:  # the latest event wins; an older one (a replay) changes nothing
        conn.execute("UPDATE contacts SET vbout_id = coalesce(?, vbout_id), email = coalesce(?, email),"
                     " phone = coalesce(?, phone), profile_url = coalesce(?, profile_url), last_seen = ?,"
                     " last_event_id = ? WHERE contact_key = ?", values + (seen, event_id, key))


def _upsert(conn, table, key_columns, key_values, values, seen):
    where = " AND ".join("%s = ?" % c for c in key_columns)
    row = conn.execute("SELECT updated_at FROM %s WHERE %s" % (table, where), key_values).fetchone()
    if row is None:
        columns = list(key_columns) + list(values) + ["updated_at"]
        conn.execute("INSERT INTO %s (%s) VALUES (%s)" % (table, ", ".join(columns), ", ".join("?" * len(columns))),
                     list(key_values) + list(values.values()) + [seen])
    elif seen >= row[0]:
        sets = ", ".join("%s = ?" % c for c in values)
        conn.execute("UPDATE %s SET %s, updated_at = ? WHERE %s" % (table, sets, where),
                     list(values.values()) + [seen] + list(key_values))


def _text(value):
    if value is None or isinstance(value, (dict, list)):
        return ""
    return str(value).strip()


def _connect(path):
    """This thread's connection to path, reopened when the file was replaced."""
    cache = getattr(_local, "connections", None)
    if cache is None:
        cache = _local.connections = {}
    try:
        st = os.stat(path)
        identity = (st.st_dev, st.st_ino)
    except FileNotFoundError:
        identity = None
    kept = cache.get(path)
    if kept is not None and kept[1] == identity and identity is not None:
        return kept[0]
    if kept is not None:
        kept[0].close()
    if identity is None:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))  # private, and its -wal and -shm too
    conn = sqlite3.connect(path, timeout=10, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    for statement in SCHEMA:
        conn.execute(statement)
    st = os.stat(path)
    cache[path] = (conn, (st.st_dev, st.st_ino))
    return conn
