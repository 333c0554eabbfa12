"""Appends one JSON line per event to a file (private permissions, rotated by size).

Each line is the event as compact JSON, {"id", "transaction_id", "received_at", "method", "data"}
(`Event.as_json()`). When the file would grow past `max_bytes`, it becomes FILE.1 (FILE.1 becomes
FILE.2, and so on, `keep` of them).
"""

import fcntl
import os

LOCAL = True  # a local file: runs in the request's thread

SETTINGS = {
    "path": ("data/events.jsonl", "The file to append to (created 0600)."),
    "max_bytes": ("10485760", "Rotate when the file would grow past this many bytes; 0 never rotates."),
    "keep": ("5", "How many rotated files to keep."),
    "fsync": ("no", "yes: flush each line to disk before the delivery counts as done (slower)."),
}


def check(settings):
    return {"path": settings.path("path"), "max_bytes": settings.number("max_bytes", 0, 1 << 40),
            "keep": settings.number("keep", 1, 1000), "fsync": settings.flag("fsync")}


def handle(event, options):
    line = (event.as_json() + "\n").encode("utf-8")
    append(options["path"], line, options["max_bytes"], options["keep"], options["fsync"])
    return None


def append(path, data, max_bytes=0, keep=5, sync=False):
    """Append data under an exclusive lock, rotating first when the file would pass max_bytes."""
    try:
        lock = os.open(path + ".lock", os.O_WRONLY | os.O_CREAT, 0o600)
    except FileNotFoundError:  # the first line: make the folder
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        lock = os.open(path + ".lock", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if max_bytes:
            try:
                size = os.path.getsize(path)
            except OSError:
                size = 0
            if size and size + len(data) > max_bytes:
                for n in range(keep - 1, 0, -1):
                    if os.path.exists("%s.%d" % (path, n)):
                        os.replace("%s.%d" % (path, n), "%s.%d" % (path, n + 1))
                os.replace(path, path + ".1")
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, data)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        os.close(lock)


def forget(email, options):
    """Remove the lines that mention email from the file and its rotations (for `listener.py forget`)."""
    needles = {email.lower().encode(), email.lower().replace("@", "%40").encode()}
    path, removed = options["path"], 0
    if not os.path.exists(os.path.dirname(path)):
        return []
    lock = os.open(path + ".lock", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for name in [path] + ["%s.%d" % (path, n) for n in range(1, options["keep"] + 1)]:
            if os.path.exists(name):
                removed += rewrite_without(name, lambda line: any(n in line.lower() for n in needles))
    finally:
        os.close(lock)
    return ["%d lines removed from %s (and its rotations)" % (removed, path)]


def rewrite_without(path, unwanted):
    """Rewrite a file in place without the lines for which unwanted(line) is true: how many went."""
    fd = os.open(path, os.O_RDWR)
    try:
        with os.fdopen(os.dup(fd), "rb") as f:
            lines = f.read().splitlines(True)
        kept = [line for line in lines if not unwanted(line)]
        if len(kept) != len(lines):
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, b"".join(kept))
            os.fsync(fd)
        return len(lines) - len(kept)
    finally:
        os.close(fd)
