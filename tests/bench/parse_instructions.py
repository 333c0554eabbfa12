#!/usr/bin/env python3
"""Instructions per parse_form of a typical Vbout POST, and per whole request through
`application`, counted by valgrind: figures the noise of a shared machine cannot move (the same
binary and input give the same count).

    python3 tests/bench/parse_instructions.py [REV ...]

Counts for listener.py as it is in the working tree and, for each git revision given, as it was
there. Each count is (a run of 300 typical calls) minus (the same run with none), over 300, under
the interpreter a web server runs for '#!/usr/bin/env python3'. The whole request has no handlers,
logs to a file and stores with durability = full: valgrind counts what runs in the process, not
the kernel's work for the disk. Needs valgrind (Debian's package `valgrind`).
"""

import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench  # noqa: E402
from conftest import SECRET, vbout_body  # noqa: E402  (bench put tests/ on sys.path)

CALLS = 300
PARSE = """
import pickle, sys
sys.path.insert(0, sys.argv[1])
import listener
for body in pickle.load(open(sys.argv[2], "rb"))[:int(sys.argv[3])]:
    listener.parse_form(body)
"""

REQUEST = """
import io, os, pickle, sys, tempfile
sys.path.insert(0, sys.argv[1])
import listener
folder = tempfile.mkdtemp(dir=os.path.dirname(sys.argv[2]))
config = os.path.join(folder, "config.ini")
with open(config, "w") as f:
    f.write("[listener]\\nsecret = %s\\nlog_file = listener.log\\ndurability = full\\n")

def call(body):
    environ = {"REQUEST_METHOD": "POST", "QUERY_STRING": "key=%s", "CONTENT_LENGTH": str(len(body)),
               "CONTENT_TYPE": "application/x-www-form-urlencoded", "wsgi.input": io.BytesIO(body),
               "wsgi.errors": sys.stderr, "REMOTE_ADDR": "127.0.0.1", "VBOUT_LISTENER_CONFIG": config}
    return b"".join(listener.application(environ, lambda status, headers, exc_info=None: None))

bodies = pickle.load(open(sys.argv[2], "rb"))
assert b'"ok": true' in call(bodies[-1])  # the database, the config and the imports, in both runs
for body in bodies[:int(sys.argv[3])]:
    call(body)
""" % (SECRET, SECRET)


def instructions(script, folder, bodies, count):
    out = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", bench.cgi_python(),
                          "-c", script, folder, bodies, str(count)], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, check=True).stdout
    return int(re.search(r"Collected : (\d+)", out).group(1))


def main():
    if not shutil.which("valgrind"):
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    folder = tempfile.mkdtemp(prefix="vbout-instructions-")
    try:
        bodies = os.path.join(folder, "bodies.pickle")
        with open(bodies, "wb") as f:
            pickle.dump([vbout_body(n) for n in range(CALLS + 1)], f)  # the last one warms up
        versions = [("working tree", bench.ROOT)]
        for rev in sys.argv[1:]:
            path = os.path.join(folder, rev.replace("/", "_"))
            os.makedirs(path)
            with open(os.path.join(path, "listener.py"), "wb") as f:
                f.write(subprocess.check_output(["git", "-C", bench.ROOT, "show", rev + ":listener.py"]))
            versions.append((rev, path))
        for title, script in (("parse_form of a typical Vbout POST", PARSE),
                              ("a whole request through application (parse, store, log)", REQUEST)):
            print("%s (%d bytes), %s, instructions per call:" % (title, len(vbout_body(0)), bench.cgi_python()))
            first = None
            for name, path in versions:
                per_call = (instructions(script, path, bodies, CALLS) - instructions(script, path, bodies, 0)) / CALLS
                first = first or per_call
                print("   %-14s %9.0f   %.2fx the working tree" % (name, per_call, per_call / first))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
