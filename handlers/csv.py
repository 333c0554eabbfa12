"""Appends a row per event to a CSV file, with the columns you choose and the header written once.

Each line of `columns` is `Header = event value`: contact.email, fields.First Name,
lead-status.label, event.received_at... A value starting with =, +, - or @ is prefixed with '
when `excel_safe` is on, so that a spreadsheet never runs it as a formula.
"""

import csv
import fcntl
import io
import os

LOCAL = True  # a local file: runs in the request's thread

SETTINGS = {
    "path": ("data/contacts.csv", "The file to append to (created 0600)."),
    "columns": ("\n    Received = event.received_at\n    Event = event.id\n    Email = contact.email\n"
                "    Vbout ID = contact.id\n    Phone = contact.phone\n    Lead status = lead-status.label",
                "Lines `Header = event value`, in order."),
    "excel_safe": ("yes", "Prefix values that a spreadsheet would run as a formula with '."),
}


def check(settings):
    columns = settings.pairs("columns")
    if not columns:
        raise settings.error("columns", "names no column", "Email = contact.email")
    return {"path": settings.path("path"), "columns": columns, "excel_safe": settings.flag("excel_safe")}


def handle(event, options):
    row = [_cell(event.get(path), options["excel_safe"]) for _, path in options["columns"]]
    path = options["path"]
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\r\n")
        if os.fstat(fd).st_size == 0:
            writer.writerow([header for header, _ in options["columns"]])
        writer.writerow(row)
        os.write(fd, out.getvalue().encode("utf-8"))
    finally:
        os.close(fd)
    return None


def _cell(value, excel_safe):
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        import json
        value = json.dumps(value, ensure_ascii=False)
    text = str(value)
    if excel_safe and text[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + text
    return text


def forget(email, options):
    """Remove the rows that mention email (for `listener.py forget`)."""
    path = options["path"]
    if not os.path.exists(path):
        return []
    needles = (email.lower(), email.lower().replace("@", "%40"))
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with os.fdopen(os.dup(fd), "r", encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
        kept = [row for i, row in enumerate(rows) if i == 0 or not any(n in cell.lower() for cell in row for n in needles)]
        if len(kept) != len(rows):
            out = io.StringIO()
            csv.writer(out, lineterminator="\r\n").writerows(kept)
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, out.getvalue().encode("utf-8"))
            os.fsync(fd)
    finally:
        os.close(fd)
    return ["%d rows removed from %s" % (len(rows) - len(kept), path)]
