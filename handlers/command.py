"""Runs a program for each event, with the event as JSON on its standard input.

`command` is split like a shell would split it, but no shell runs it (no pipes, no $VARS).
A non-zero exit fails the delivery with the exit status and the last line the program wrote to
stderr. If the program prints a JSON object on stdout, that is the delivery's result (for
[listener] respond_with). Request headers (HTTP_*) are not passed on in its environment.
"""

import json
import os
import shlex
import subprocess

SETTINGS = {
    "command": ("", "The program and its arguments, for example: /usr/bin/python3 /home/me/on_contact.py --live"),
    "cwd": ("", "Folder to run it in; empty: the config file's folder."),
}


def check(settings):
    try:
        argv = shlex.split(settings.get("command", ""))
    except ValueError as e:
        raise settings.error("command", "cannot be split into arguments: %s" % e) from None
    if not argv:
        raise settings.error("command", "is empty", "/usr/bin/python3 /home/me/on_contact.py")
    return {"argv": argv, "timeout": settings.timeout,
            "cwd": settings.path("cwd") or settings.folder}


def handle(event, options):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HTTP_")}
    try:
        proc = subprocess.run(options["argv"], input=event.as_json().encode("utf-8"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=options["cwd"], env=env,
                              timeout=options["timeout"])
    except subprocess.TimeoutExpired:
        raise RuntimeError("killed after %g s" % options["timeout"]) from None
    if proc.returncode != 0:
        lines = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise RuntimeError("exit status %d%s" % (proc.returncode, ": " + lines[-1] if lines else ""))
    try:
        result = json.loads(proc.stdout.decode("utf-8"))
    except ValueError:
        return None
    return result if isinstance(result, dict) else None
