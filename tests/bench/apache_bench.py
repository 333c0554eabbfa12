#!/usr/bin/env python3
"""The listener under Apache against the listeners people write by hand, in the same Apache.

    python3 tests/bench/apache_bench.py [--quick]     (as root: it starts a private Apache)

One private Apache 2.4 (prefork, since mod_php needs it) on 127.0.0.1 serves five contenders
the same typical ~3.3 KB Vbout form POSTs; all but the do-nothing app store them durably in
SQLite (WAL, synchronous=FULL):
- the listener, under mod_wsgi daemon mode (processes=1 threads=15, as the README shows it);
- tests/bench/peers/listener.php under mod_php ($_POST, PDO SQLite, one INSERT);
- tests/bench/peers/flask_listener.py, Flask under mod_wsgi daemon mode (the same layout);
- a do-nothing WSGI app under mod_wsgi daemon mode: the floor of that mode (not a target);
- the listener again, under mod_wsgi embedded mode (in Apache's own processes, as mod_php runs):
  what the hop to a daemon costs (not a target).
Rounds interleave the contenders. Each round sends the same number of requests at the same
concurrency over keep-alive connections, and reads the CPU time (user + sys) of every process of
that Apache before and after; ratios are taken round by round, and their median printed. The disk's fsync rate caps every contender, so CPU per request is
the figure to compare; requests per second is printed too, and how each contender's CPU splits
between Apache's own processes and its mod_wsgi daemon. Targets (issue 4): CPU per request at
most 1.3x mod_php's and 0.6x Flask's; requests per second at least 0.9x mod_php's.

Debian's apache2, libapache2-mod-wsgi-py3, libapache2-mod-php, php-sqlite3 and python3-flask are
installed when missing. Then the same CGI comparison as tests/bench/bench.py (section 2) runs
under this Apache: the listener as CGI against a do-nothing wsgiref CGI script.
"""

import concurrent.futures
import http.client
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
sys.path.insert(0, TESTS)

import apache  # noqa: E402
from conftest import SECRET, vbout_body  # noqa: E402

PACKAGES = [("/usr/sbin/apache2", "apache2"), ("/usr/lib/apache2/modules/mod_wsgi.so", "libapache2-mod-wsgi-py3"),
            ("/usr/lib/apache2/modules/libphp8.2.so", "libapache2-mod-php"),
            ("/usr/lib/php/*/pdo_sqlite.so", "php-sqlite3"), ("/usr/lib/python3/dist-packages/flask", "python3-flask")]

CONFIG = """
WSGISocketPrefix "{root}/wsgi"
StartServers 8
MinSpareServers 8
MaxSpareServers 16
MaxRequestWorkers 32
MaxConnectionsPerChild 0
KeepAlive On
MaxKeepAliveRequests 0
DocumentRoot "{root}/htdocs"
<Directory "{root}/htdocs">
    AllowOverride None
    Require all granted
</Directory>
<FilesMatch "\\.php$">
    SetHandler application/x-httpd-php
</FilesMatch>
SetEnv VBOUT_SECRET {secret}
SetEnv VBOUT_PHP_DB {root}/phpdata/events.sqlite3
SetEnv VBOUT_FLASK_DB {root}/flaskdata/events.sqlite3
WSGIDaemonProcess vbout processes=1 threads=15 display-name=vbout-listener
WSGIScriptAlias /wsgi/listener.py "{root}/app/listener.py" process-group=vbout application-group=%{{GLOBAL}}
WSGIDaemonProcess nothing processes=1 threads=15 display-name=vbout-nothing
WSGIScriptAlias /nothing "{root}/nothing/nothing.py" process-group=nothing application-group=%{{GLOBAL}}
<Directory "{root}/nothing">
    Require all granted
</Directory>
WSGIDaemonProcess flask processes=1 threads=15 display-name=vbout-flask
WSGIScriptAlias /flask "{root}/flask/flask_listener.py" process-group=flask application-group=%{{GLOBAL}}
WSGIScriptAlias /embedded/listener.py "{root}/embedded/listener.py" application-group=%{{GLOBAL}}
<Directory "{root}/app">
    Require all granted
</Directory>
<Directory "{root}/embedded">
    Require all granted
</Directory>
<Directory "{root}/flask">
    Require all granted
</Directory>
<Directory "{root}/htdocs/cgi">
    Options +ExecCGI
    AddHandler cgi-script .py
</Directory>
"""

NOTHING_WSGI = """
def application(environ, start_response):
    environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", "12")])
    return [b'{"ok": true}']
"""

NOTHING_CGI = """#!/usr/bin/env python3
from wsgiref.handlers import CGIHandler
def app(environ, start_response):
    environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", "12")])
    return [b'{"ok": true}']
CGIHandler().run(app)
"""


def ensure_packages():
    import glob
    missing = [package for path, package in PACKAGES if not glob.glob(path)]
    if missing:
        print("installing %s" % " ".join(missing), flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.call(["apt-get", "update", "-qq"], env=env, stdout=subprocess.DEVNULL)
        subprocess.check_call(["apt-get", "install", "-y", "-qq", "--no-install-recommends"] + missing, env=env,
                              stdout=subprocess.DEVNULL)
    # Debian enables mod_php's and mod_wsgi's system configs for the system Apache; ours reads none of them.


class Bench:
    def __init__(self):
        self.root = apache.tempfile.mkdtemp(prefix="vbout-apache-bench-")
        os.chmod(self.root, 0o755)
        self.port = apache.free_port()
        root = self.root
        for folder in ("htdocs/php", "htdocs/cgi", "phpdata", "flask", "flaskdata"):
            os.makedirs(os.path.join(root, folder))
        shutil.copy(os.path.join(HERE, "peers", "listener.php"), os.path.join(root, "htdocs/php"))
        shutil.copy(os.path.join(HERE, "peers", "flask_listener.py"), os.path.join(root, "flask"))
        for app in (os.path.join(root, "app"), os.path.join(root, "embedded")):
            os.makedirs(app)
            for name in ("listener.py", "handlers"):
                source = os.path.join(apache.ROOT, name)
                (shutil.copytree if os.path.isdir(source) else shutil.copy2)(source, os.path.join(app, name))
            with open(os.path.join(app, "config.ini"), "w") as f:
                f.write("[listener]\nsecret = %s\ndurability = full\n" % SECRET)
        os.makedirs(os.path.join(root, "nothing"))
        with open(os.path.join(root, "nothing", "nothing.py"), "w") as f:
            f.write(NOTHING_WSGI)
        cgi = os.path.join(root, "htdocs", "cgi")
        for name in ("listener.py", "handlers"):
            source = os.path.join(apache.ROOT, name)
            (shutil.copytree if os.path.isdir(source) else shutil.copy2)(source, os.path.join(cgi, name))
        with open(os.path.join(cgi, "config.ini"), "w") as f:
            f.write("[listener]\nsecret = %s\n" % SECRET)
        with open(os.path.join(cgi, "nothing.py"), "w") as f:
            f.write(NOTHING_CGI)
        os.chmod(os.path.join(cgi, "nothing.py"), 0o755)
        subprocess.check_call(["chown", "-R", "www-data:www-data", root])
        with open(os.path.join(root, "httpd.conf"), "w") as f:
            f.write(apache.server_header(root, self.port, "prefork", *apache.modules("alias", "env", "cgi", "wsgi"),
                                         ("php", "libphp8.2.so")) + CONFIG.format(root=root, secret=SECRET))
        env = {"PATH": apache.SERVER_PATH, "LANG": "C", "VBOUT_FLASK_DB": os.path.join(root, "flaskdata", "events.sqlite3")}
        result = subprocess.run([apache.HTTPD, "-f", os.path.join(root, "httpd.conf"), "-k", "start"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if result.returncode != 0:
            raise SystemExit("apache2 did not start: " + result.stdout)
        time.sleep(1.5)
        with open(os.path.join(root, "httpd.pid")) as f:
            self.pid = int(f.read())

    def cpu_seconds(self):
        """user + sys of the Apache and every process below it: {"apache": s, daemon display-name: s}."""
        parents, times, groups = {}, {}, {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    with open("/proc/%s/stat" % name) as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                    with open("/proc/%s/cmdline" % name, "rb") as f:
                        command = f.read().split(b"\0")[0].decode("latin-1").strip()
                except OSError:
                    continue
                parents[int(name)] = int(fields[1])
                times[int(name)] = int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
                groups[int(name)] = command if command.startswith("vbout-") else "apache"  # mod_wsgi's display-name
        total = {}
        for pid, ticks in times.items():
            p = pid
            while p > 1 and p != self.pid:
                p = parents.get(p, 1)
            if p == self.pid:
                total[groups[pid]] = total.get(groups[pid], 0) + ticks / os.sysconf("SC_CLK_TCK")
        return total

    def load(self, path, bodies, concurrency):
        """Send the bodies over keep-alive connections: (seconds, statuses)."""
        chunks = [bodies[i::concurrency] for i in range(concurrency)]

        def worker(chunk):
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
            statuses = []
            for body in chunk:
                conn.request("POST", path, body, {"Content-Type": "application/x-www-form-urlencoded"})
                response = conn.getresponse()
                response.read()
                statuses.append(response.status)
            conn.close()
            return statuses

        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            statuses = [s for result in pool.map(worker, chunks) for s in result]
        return time.perf_counter() - start, statuses

    def close(self):
        subprocess.run([apache.HTTPD, "-f", os.path.join(self.root, "httpd.conf"), "-k", "stop"],
                       env={"PATH": apache.SERVER_PATH})
        time.sleep(1)
        shutil.rmtree(self.root, ignore_errors=True)


def main():
    quick = "--quick" in sys.argv
    if os.geteuid() != 0:
        raise SystemExit("run as root: this starts a private Apache that switches to www-data")
    ensure_packages()
    rounds, per_round, concurrency = (3, 300, 8) if quick else (10, 600, 8)
    bench = Bench()
    contenders = [("listener (mod_wsgi)", "/wsgi/listener.py?key=" + SECRET),
                  ("mod_php + PDO", "/php/listener.php?key=" + SECRET),
                  ("Flask (mod_wsgi)", "/flask/?key=" + SECRET),
                  ("do-nothing (mod_wsgi)", "/nothing/?key=" + SECRET),
                  ("listener (embedded)", "/embedded/listener.py?key=" + SECRET)]
    results = {name: {"cpu": [], "rps": [], "split": []} for name, _ in contenders}
    answered = dict.fromkeys(results, 0)  # 200s actually received, warm-up included
    serial = 0
    try:
        for name, path in contenders:  # warm up each (daemon processes, opcode cache, imports)
            answered[name] += bench.load(path, [vbout_body(10 ** 7 + serial + i) for i in range(50)],
                                         concurrency)[1].count(200)
            serial += 50
        for round_ in range(rounds):
            for name, path in contenders:
                bodies = [vbout_body(serial + i) for i in range(per_round)]
                serial += per_round
                before = bench.cpu_seconds()
                seconds, statuses = bench.load(path, bodies, concurrency)
                after = bench.cpu_seconds()
                used = {group: (after[group] - before.get(group, 0)) / per_round * 1000 for group in after}
                assert statuses.count(200) == per_round, (name, sorted(set(statuses)))
                answered[name] += per_round
                results[name]["cpu"].append(sum(used.values()))
                results[name]["split"].append(used)
                results[name]["rps"].append(per_round / seconds)
        print("Apache %s, prefork; %d rounds x %d requests per contender at concurrency %d; body %d bytes"
              % (subprocess.check_output([apache.HTTPD, "-v"], text=True).split()[2], rounds, per_round,
                 concurrency, len(vbout_body(0))))
        for name, _ in contenders:
            cpu, rps = statistics.median(results[name]["cpu"]), statistics.median(results[name]["rps"])
            split = results[name]["split"]
            parts = ", ".join("%s %.2f" % (group, statistics.median(s.get(group, 0) for s in split))
                              for group in sorted({g for s in split for g in s})
                              if statistics.median(s.get(group, 0) for s in split) >= 0.005)
            print("   %-22s %5.2f ms CPU per request   %6.0f requests/s   (median of rounds; %s)"
                  % (name, cpu, rps, parts))
        # No request answered 200 may be missing from the database afterwards.
        import sqlite3
        for name, path in (("listener (mod_wsgi)", "app/data/events.sqlite3"), ("mod_php + PDO", "phpdata/events.sqlite3"),
                           ("Flask (mod_wsgi)", "flaskdata/events.sqlite3"),
                           ("listener (embedded)", "embedded/data/events.sqlite3")):
            stored = sqlite3.connect(os.path.join(bench.root, path)).execute("SELECT count(*) FROM events").fetchone()[0]
            print("   %-22s %d answered 200, %d stored%s" % (name, answered[name], stored, "" if stored == answered[name]
                                                             else "  <-- MISSING %d" % (answered[name] - stored)))
        names = [name for name, _ in contenders]

        def paired(a, b, key="cpu"):
            """Median and range of a's figure over b's, round by round: a busy moment of the
            machine lands on both contenders of a round, and the median drops the worst rounds."""
            ratios = sorted(x / y for x, y in zip(results[a][key], results[b][key]))
            return "%.2fx (rounds %.2f-%.2f)" % (statistics.median(ratios), ratios[0], ratios[-1])

        print("   CPU per request: %s mod_php's (target <= 1.3), %s Flask's (target <= 0.6)"
              % (paired(names[0], names[1]), paired(names[0], names[2])))
        print("   requests per second: %s mod_php's (target >= 0.9)" % paired(names[0], names[1], "rps"))
        print("   not a target: the listener in mod_wsgi embedded mode uses %s mod_php's CPU per request"
              % paired(names[4], names[1]))
        cgi_rounds = 15 if quick else 40
        times = {"listener.py": [], "nothing.py": []}
        for i in range(cgi_rounds):
            for script in times:
                body = vbout_body(10 ** 8 + serial)
                serial += 1
                start = time.perf_counter()
                seconds, statuses = bench.load("/cgi/%s?key=%s" % (script, SECRET), [body], 1)
                assert statuses == [200], (script, statuses)
                times[script].append(seconds)
        ours_cgi, nothing = statistics.median(times["listener.py"]), statistics.median(times["nothing.py"])
        print("   CGI: a stored POST %.1f ms, a do-nothing wsgiref CGI %.1f ms: %.2fx (target <= 2.0)"
              % (ours_cgi * 1000, nothing * 1000, ours_cgi / nothing))
    finally:
        bench.close()


if __name__ == "__main__":
    main()
