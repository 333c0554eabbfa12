"""The Flask peer for tests/bench/apache_bench.py: what a Flask listener for Vbout typically is.

request.form, one INSERT into SQLite per request, durably (WAL, synchronous=FULL).
"""
import hmac
import json
import sqlite3
from datetime import datetime, timezone

from flask import Flask, jsonify, request

app = application = Flask(__name__)


@app.route("/", methods=["POST"])
def receive():
    # SetEnv reaches the WSGI environ under mod_wsgi, not os.environ.
    if not hmac.compare_digest(request.args.get("key", ""), request.environ.get("VBOUT_SECRET", "x")):
        return jsonify(ok=False, error="The key is missing or wrong.", status=403), 403
    db = sqlite3.connect(request.environ["VBOUT_FLASK_DB"], timeout=5)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, transaction_id TEXT UNIQUE,"
                   " received_at TEXT, payload TEXT, raw_body BLOB, contact_email TEXT)")
        form = request.form.to_dict(flat=False)
        with db:
            cursor = db.execute("INSERT OR IGNORE INTO events (transaction_id, received_at, payload, raw_body,"
                                " contact_email) VALUES (?, ?, ?, ?, ?)",
                                (request.form.get("transactionid"), datetime.now(timezone.utc).isoformat(),
                                 json.dumps(form), request.get_data(), request.form.get("contact[email]")))
        return jsonify(ok=True, event_id=cursor.lastrowid, duplicate=False)
    finally:
        db.close()
