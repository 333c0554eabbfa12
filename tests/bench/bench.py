#!/usr/bin/env python3
"""Speed and memory figures for the listener core, each with a baseline measured in the same run.

    python3 tests/bench/bench.py [--quick]

1. parse_form against urllib.parse.parse_qsl on Vbout-shaped bodies of 100 KB, 1 MB and 4 MB
   (target: ratio <= 1.0, and cost per MB at 4 MB <= 1.6x that at 100 KB).
2. A CGI request storing a typical Vbout POST (~3.3 KB) against a do-nothing CGI script that
   answers through wsgiref.handlers, each a fresh process as under Apache (target: <= 2x).
3. Peak memory (VmHWM) of a process handling a 1 MB body through `application` (target: <= 30 MB).
4. A typical Vbout POST through `application` with the contacts and jsonl handlers inline against
   the same with no handlers, in one process (target: <= 2x).

Timings are medians of interleaved runs: this machine is shared and noisy, so the ratios are
what to read. Nothing here is a pass/fail test; it prints figures.
"""

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(HERE))

import listener  # noqa: E402
from conftest import SECRET, vbout_body, write_config  # noqa: E402

NOTHING_CGI = """#!%s
from wsgiref.handlers import CGIHandler
def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", "11")])
    return [b'{"ok": true}'[:11]]
CGIHandler().run(app)
"""

MEMORY_PROBE = """
import io, sys
sys.path.insert(0, %r)
import listener
body = open(sys.argv[2], "rb").read()
environ = {"REQUEST_METHOD": "POST", "QUERY_STRING": "key=%s", "CONTENT_LENGTH": str(len(body)),
           "CONTENT_TYPE": "application/x-www-form-urlencoded", "wsgi.input": io.BytesIO(body),
           "wsgi.errors": sys.stderr, "VBOUT_LISTENER_CONFIG": sys.argv[1]}
del body
status = []
answer = b"".join(listener.application(environ, lambda s, h, e=None: status.append(s)))
assert status[0].startswith("200"), (status, answer)
for line in open("/proc/self/status"):
    if line.startswith(("VmHWM", "VmRSS")):
        print(line.split()[1], end=" ")
"""


def shaped_body(target):
    """A Vbout-shaped form body of about `target` bytes: contact, many fields and activities."""
    parts = ["transactionid=123456789", "contact%5Bid%5D=42", "contact%5Bemail%5D=ana%40example.com"]
    size, i = 0, 0
    while size < target:
        group = ["fields%%5B%d%%5D%%5Bid%%5D=%d" % (i, 1000 + i),
                 "fields%%5B%d%%5D%%5Bname%%5D=Custom+Field+%d" % (i, i),
                 "fields%%5B%d%%5D%%5Bvalue%%5D=Some+value+%%C3%%A9+%d" % (i, i),
                 "campaigns-opened%%5B%d%%5D%%5Bopen_date%%5D=2026-11-26+10%%3A00%%3A00" % i]
        parts += group
        size += sum(len(g) + 1 for g in group)
        i += 1
    return "&".join(parts).encode("ascii")


def best_of(fn, rounds):
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_parse(quick):
    rounds = 3 if quick else 7
    print("1. parse_form vs urllib.parse.parse_qsl (best of %d; sizes and contenders interleaved)" % rounds)
    sizes = (100_000, 1_000_000, 4_000_000)
    bodies = {size: shaped_body(size) for size in sizes}
    texts = {size: body.decode("ascii") for size, body in bodies.items()}
    ours, theirs = {size: [] for size in sizes}, {size: [] for size in sizes}
    # Round-robin over the sizes, so that a noisy moment of this shared machine (or the first,
    # cold run) cannot land on one size only and bend the linearity figure.
    for _ in range(rounds):
        for size in sizes:
            body, text = bodies[size], texts[size]
            ours[size].append(best_of(lambda: listener.parse_form(body, max_params=10 ** 7), 1))
            theirs[size].append(best_of(lambda: urllib.parse.parse_qsl(text, keep_blank_values=True,
                                                                       max_num_fields=None), 1))
    per_mb = {}
    for size in sizes:
        mb = len(bodies[size]) / 1e6
        ours_ms, theirs_ms = min(ours[size]) * 1000 / mb, min(theirs[size]) * 1000 / mb
        per_mb[size] = ours_ms
        print("   %5.1f MB, %6d params: parse_form %6.1f ms/MB   parse_qsl %6.1f ms/MB   ratio %.2f (target <= 1.0)"
              % (mb, bodies[size].count(b"&") + 1, ours_ms, theirs_ms, ours_ms / theirs_ms))
    print("   linearity: cost per MB at 4 MB / at 100 KB = %.2f (target <= 1.6)"
          % (per_mb[4_000_000] / per_mb[100_000]))
    # What every request pays: typical calls (same names, other values), the best of several batches.
    calls = [vbout_body(n) for n in range(300 if quick else 1000)]
    texts = [body.decode("ascii") for body in calls]
    ours = min(best_of(lambda: [listener.parse_form(body) for body in calls], 1) for _ in range(rounds))
    theirs = min(best_of(lambda: [urllib.parse.parse_qsl(text, keep_blank_values=True) for text in texts], 1)
                 for _ in range(rounds))
    print("   a typical Vbout POST (%d bytes, %d params): parse_form %.0f us, parse_qsl %.0f us, ratio %.2f"
          % (len(calls[0]), calls[0].count(b"&") + 1, ours / len(calls) * 1e6, theirs / len(calls) * 1e6,
             ours / theirs))


def cgi_environ(config, body):
    env = {"GATEWAY_INTERFACE": "CGI/1.1", "REQUEST_METHOD": "POST", "QUERY_STRING": "key=" + SECRET,
           "CONTENT_LENGTH": str(len(body)), "CONTENT_TYPE": "application/x-www-form-urlencoded",
           "SERVER_PROTOCOL": "HTTP/1.1", "SERVER_NAME": "localhost", "SERVER_PORT": "80",
           "SCRIPT_NAME": "/listener.py", "REMOTE_ADDR": "127.0.0.1", "PATH": os.environ.get("PATH", ""),
           "VBOUT_LISTENER_CONFIG": config}
    return env


def cgi_python():
    """The interpreter a web server runs for '#!/usr/bin/env python3': Debian's, when there is one."""
    return "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable


def run_cgi(script, env, body):
    """One CGI request in a fresh process: (wall seconds, child CPU seconds, output)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([cgi_python(), script], env=env, input=body, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.stdout


def bench_cgi(quick, folder):
    rounds = 15 if quick else 60
    print("2. CGI request storing a typical Vbout POST vs a do-nothing wsgiref CGI (%d each, interleaved)" % rounds)
    site = os.path.join(folder, "cgi")
    os.makedirs(site)
    shutil.copy2(os.path.join(ROOT, "listener.py"), site)
    config = write_config(site, log_file=None)
    nothing = os.path.join(site, "nothing.py")
    with open(nothing, "w") as f:
        f.write(NOTHING_CGI % cgi_python())
    env = cgi_environ(config, b"")
    ours, base, ours_cpu, base_cpu = [], [], [], []
    for i in range(rounds):
        body = vbout_body(i)
        env["CONTENT_LENGTH"] = str(len(body))
        wall, cpu, out = run_cgi(os.path.join(site, "listener.py"), env, body)
        assert b"Status: 200" in out and b'"duplicate": false' in out, out
        ours.append(wall)
        ours_cpu.append(cpu)
        wall, cpu, out = run_cgi(nothing, env, body)
        assert b"Status: 200" in out, out
        base.append(wall)
        base_cpu.append(cpu)
    o, b = statistics.median(ours) * 1000, statistics.median(base) * 1000
    oc, bc = statistics.median(ours_cpu) * 1000, statistics.median(base_cpu) * 1000
    print("   body %d bytes, durability=full, interpreter %s" % (len(vbout_body(0)), cgi_python()))
    print("   listener.py as CGI: %6.1f ms wall, %5.1f ms CPU (median)" % (o, oc))
    print("   do-nothing wsgiref: %6.1f ms wall, %5.1f ms CPU (median)" % (b, bc))
    print("   ratio: wall %.2f, CPU %.2f (target <= 2.0)" % (o / b, oc / bc if bc else float("nan")))
    # A CGI script's bytecode is never cached: Python compiles listener.py whole on every request.
    probe = ("import time; src = open(%r).read(); t = time.perf_counter(); compile(src, 'listener.py', 'exec');"
             " print((time.perf_counter() - t) * 1000, src.count(chr(10)))" % os.path.join(ROOT, "listener.py"))
    compiles = [subprocess.check_output([cgi_python(), "-c", probe], text=True).split() for _ in range(5)]
    print("   of which compiling listener.py (%s lines): %.1f ms (median of 5 fresh processes)"
          % (compiles[0][1], statistics.median(float(c[0]) for c in compiles)))


def bench_memory(folder):
    print("3. Peak memory of a process handling a 1 MB body through application")
    site = os.path.join(folder, "memory")
    os.makedirs(site)
    config = write_config(site, max_params="1000000")
    body = shaped_body(1_000_000)
    path = os.path.join(site, "body.bin")
    with open(path, "wb") as f:
        f.write(body)
    # As deployed: bytecode cached in __pycache__ (an environment that forbids it would add the
    # compiler's own peak to every figure).
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    subprocess.check_call([sys.executable, "-c", "import sys; sys.path.insert(0, %r); import listener" % ROOT],
                          env=env)
    baseline = subprocess.check_output(
        [sys.executable, "-c", "import sys; sys.path.insert(0, %r); import listener, sqlite3, json\n"
         "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])" % ROOT],
        text=True, env=env)
    out = subprocess.check_output([sys.executable, "-c", MEMORY_PROBE % (ROOT, SECRET), config, path],
                                  text=True, env=env)
    hwm, rss = [int(x) for x in out.split()]
    print("   body %.2f MB, %d params: VmHWM %.1f MB (target <= 30); the same process before"
          " any request: %.1f MB" % (len(body) / 1e6, body.count(b"&") + 1, hwm / 1024, int(baseline) / 1024))


def bench_handlers(quick, folder):
    import io
    rounds = 60 if quick else 300
    print("4. A typical Vbout POST through application: contacts + jsonl inline vs no handlers"
          " (%d each, interleaved, in-process)" % rounds)
    configs = []
    for name, extra in (("plain", ""), ("handled", "[handlers]\nenabled = contacts, jsonl\n")):
        os.makedirs(os.path.join(folder, name))
        configs.append(write_config(os.path.join(folder, name)))
        with open(configs[-1], "a") as f:
            f.write(extra)
    bodies = [vbout_body(n) for n in range(rounds + 5)]  # made before timing anything

    def post(config, body):
        environ = {"REQUEST_METHOD": "POST", "QUERY_STRING": "key=" + SECRET, "CONTENT_LENGTH": str(len(body)),
                   "CONTENT_TYPE": "application/x-www-form-urlencoded", "wsgi.input": io.BytesIO(body),
                   "wsgi.errors": sys.stderr, "VBOUT_LISTENER_CONFIG": config}
        status = []
        out = b"".join(listener.application(environ, lambda s, h, e=None: status.append(s)))
        assert status[0].startswith("200") and b'"duplicate": false' in out, out

    results = {config: ([], []) for config in configs}
    for body in bodies[:5]:  # warm up: connections, handler modules, worker threads
        for config in configs:
            post(config, body)
    for body in bodies[5:]:
        for config in configs:
            wall, cpu = time.perf_counter(), time.process_time()
            post(config, body)
            results[config][0].append(time.perf_counter() - wall)
            results[config][1].append(time.process_time() - cpu)
    (pw, pc), (hw, hc) = [(statistics.median(w) * 1000, statistics.median(c) * 1000) for w, c in results.values()]
    print("   no handlers:      %5.2f ms wall, %5.2f ms CPU per request (median)" % (pw, pc))
    print("   contacts + jsonl: %5.2f ms wall, %5.2f ms CPU per request (median)" % (hw, hc))
    print("   ratio: CPU %.2f (target <= 2.0); wall %.2f (each SQLite commit waits for the disk's fsync)"
          % (hc / pc, hw / pw))


def main():
    quick = "--quick" in sys.argv
    print("Vbout listener %s, Python %s, SQLite %s" % (
        listener.__version__, sys.version.split()[0], __import__("sqlite3").sqlite_version))
    folder = tempfile.mkdtemp(prefix="vbout-bench-")
    try:
        bench_parse(quick)
        bench_cgi(quick, folder)
        bench_memory(folder)
        bench_handlers(quick, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
