#!/usr/bin/env python3
"""What a CGI request would cost if listener.py held less code: the figures behind a layout decision.

    python3 tests/bench/cgi_size_probe.py [--quick]

Python compiles a CGI script whole on every request (a script's bytecode is never cached), so a
CGI request's time grows with listener.py's size. This probe cuts two smaller copies out of
listener.py by its section banners and times one CGI request storing a typical Vbout POST (no
handlers enabled) with each, interleaved with the whole file and a do-nothing wsgiref CGI:

- "request path + handlers": without the Operator's tools, the Status page and the command-line
  commands (what a module imported lazily by listener.py could hold);
- "request path only": without the Handlers section as well.

The copies serve this one request and nothing else; they are measurements, not products.
"""

import os
import shutil
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench  # noqa: E402
from conftest import vbout_body, write_config  # noqa: E402  (bench put tests/ on sys.path)

MAIN = '''

def main(argv=None):
    run_cgi()
    close_connections()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
'''


def section(lines, banner):
    """Index of the banner line of a section ('# Status page ####...'), whose rule line precedes it."""
    for i, line in enumerate(lines):
        if line.startswith("# " + banner + " #"):
            return i - 1
    raise SystemExit("listener.py has no section %r any more: update this probe" % banner)


def cut(lines, *spans):
    """lines without the spans (start banner, end banner or a line prefix), plus a CGI-only main()."""
    keep = list(lines)
    for start, end in reversed(spans):
        a = section(keep, start)
        b = next(i for i, line in enumerate(keep) if line.startswith(end)) if end.startswith("def ") \
            else section(keep, end)
        del keep[a:b]
    b = next(i for i, line in enumerate(keep) if line.startswith("def _load_or_exit"))
    return "".join(keep[:b]) + MAIN


def main():
    quick = "--quick" in sys.argv
    rounds = 15 if quick else 40
    with open(os.path.join(bench.ROOT, "listener.py")) as f:
        lines = f.readlines()
    variants = {
        "listener.py as it is": "".join(lines),
        "request path + handlers": cut(lines, ("Operator's tools", "WSGI application")),
        "request path only": cut(lines, ("Handlers", "WSGI application")),
    }
    folder = tempfile.mkdtemp(prefix="vbout-cgi-probe-")
    try:
        scripts = {}
        for name, text in variants.items():
            site = os.path.join(folder, "v%d" % len(scripts))  # each its own database
            os.makedirs(site)
            with open(os.path.join(site, "listener.py"), "w") as f:
                f.write(text)
            scripts[name] = (site, text.count("\n"), write_config(site, log_file=None))
        nothing = os.path.join(folder, "nothing.py")
        with open(nothing, "w") as f:
            f.write(bench.NOTHING_CGI % bench.cgi_python())
        times = {name: [] for name in list(scripts) + ["do-nothing wsgiref CGI"]}
        for i in range(rounds):
            body = vbout_body(i)
            for name, (site, _, config) in scripts.items():
                env = bench.cgi_environ(config, b"")
                env["CONTENT_LENGTH"] = str(len(body))
                wall, _, out = bench.run_cgi(os.path.join(site, "listener.py"), env, body)
                assert b"Status: 200" in out and b'"duplicate": false' in out, (name, out[:300])
                times[name].append(wall)
            times["do-nothing wsgiref CGI"].append(bench.run_cgi(nothing, env, body)[0])
        base = statistics.median(times["do-nothing wsgiref CGI"])
        print("CGI request storing a typical Vbout POST, %d rounds interleaved, interpreter %s"
              % (rounds, bench.cgi_python()))
        for name, values in times.items():
            size = "%5d lines" % scripts[name][1] if name in scripts else "           "
            print("   %-26s %s  %6.1f ms  %.2fx the do-nothing CGI (target <= 2.0)"
                  % (name, size, statistics.median(values) * 1000, statistics.median(values) / base))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
