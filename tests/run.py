#!/usr/bin/env python3
"""Install what the tests need into a private virtual environment, then run them.

    python3 tests/run.py                 # the whole suite
    python3 tests/run.py -k parse_form   # any pytest arguments pass through
    python3 tests/run.py --python python3.8   # on another interpreter
    python3 tests/run.py --matrix        # on every Python 3.8-3.13 found (pyenv or PATH)

The environment lives in tests/.venv-<python version>/ and is reused while
tests/requirements.txt is unchanged. System tools the tests use (php-cli, to prove the form
parser against PHP itself) are installed with apt-get when missing and this runs as root;
otherwise the tests that need them are skipped with a reason, except under CI (CI=true),
where a missing tool is an error.
"""

import glob
import hashlib
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
REQUIREMENTS = os.path.join(HERE, "requirements.txt")
# What the tests use from the system: (a command or a file, the Debian package that provides it).
SYSTEM_PACKAGES = [
    ("php", "php-cli"),  # PHP's own parse_str and http_build_query, for the parser's semantics
    ("/usr/sbin/apache2", "apache2"),  # the deployment tests: CGI on a real Apache...
    ("/usr/lib/apache2/modules/mod_wsgi.so", "libapache2-mod-wsgi-py3"),  # ...mod_wsgi...
    ("/usr/lib/apache2/modules/mod_passenger.so", "libapache2-mod-passenger"),  # ...and Passenger
    ("chromium", "chromium"),  # the status page in a real browser...
    ("chromedriver", "chromium-driver"),  # ...driven through selenium
]


def say(message):
    print("tests/run.py: %s" % message, flush=True)


def venv_python(python):
    """The virtual environment's interpreter for `python`, created and filled when needed."""
    version = subprocess.check_output(
        [python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], text=True).strip()
    folder = os.path.join(HERE, ".venv-" + version)
    exe = os.path.join(folder, "bin", "python")
    stamp = os.path.join(folder, ".requirements.sha256")
    with open(REQUIREMENTS, "rb") as f:
        wanted = hashlib.sha256(f.read()).hexdigest()
    if os.path.exists(exe) and os.path.exists(stamp) and open(stamp).read() == wanted:
        return exe
    if not os.path.exists(exe):
        say("creating %s" % os.path.relpath(folder, ROOT))
        if subprocess.call([python, "-m", "venv", folder]) != 0:
            apt_install("python3-venv")
            shutil.rmtree(folder, ignore_errors=True)
            subprocess.check_call([python, "-m", "venv", folder])
    say("installing %s" % os.path.relpath(REQUIREMENTS, ROOT))
    subprocess.check_call([exe, "-m", "pip", "install", "-q", "--disable-pip-version-check",
                           "-r", REQUIREMENTS])
    with open(stamp, "w") as f:
        f.write(wanted)
    return exe


def apt_install(*packages):
    """apt-get install, when this runs as root on a Debian-like system; False otherwise."""
    if not shutil.which("apt-get") or os.geteuid() != 0:
        return False
    say("installing %s with apt-get" % " ".join(packages))
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.call(["apt-get", "update", "-qq"], env=env, stdout=subprocess.DEVNULL)
    return subprocess.call(["apt-get", "install", "-y", "-qq", "--no-install-recommends"] + list(packages),
                           env=env, stdout=subprocess.DEVNULL) == 0


def present(tool):
    return os.path.exists(tool) if tool.startswith("/") else shutil.which(tool) is not None


def system_tools():
    missing = [package for tool, package in SYSTEM_PACKAGES if not present(tool)]
    if missing:
        apt_install(*missing)
    still = [tool for tool, _ in SYSTEM_PACKAGES if not present(tool)]
    if still and os.environ.get("CI"):
        say("error: %s missing and could not be installed" % ", ".join(still))
        raise SystemExit(1)
    for tool in still:
        say("%s is missing: the tests that need it will be skipped" % tool)


def run_suite(python, argv):
    exe = venv_python(python)
    command = [exe, "-m", "pytest", "-p", "no:cacheprovider", HERE] + argv
    say("running %s" % " ".join(command[2:]))
    code = subprocess.call(command, cwd=ROOT)
    if code == 5:
        say("error: pytest collected no tests")
        return 1
    return code


def interpreters():
    """One interpreter per Python 3.8-3.13 found: pyenv's versions, else python3.X on PATH."""
    found = {}
    root = subprocess.run(["pyenv", "root"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          text=True).stdout.strip() if shutil.which("pyenv") else ""
    for minor in range(8, 14):
        candidates = sorted(glob.glob(os.path.join(root, "versions", "3.%d.*" % minor, "bin", "python")))
        exe = candidates[-1] if root and candidates else shutil.which("python3.%d" % minor)
        if exe:
            found["3.%d" % minor] = exe
    return found


def main(argv):
    python = sys.executable
    if argv[:1] == ["--python"] and len(argv) > 1:
        python, argv = shutil.which(argv[1]) or argv[1], argv[2:]
    system_tools()
    if argv[:1] != ["--matrix"]:
        return run_suite(python, argv)
    results = {}
    for version, exe in interpreters().items():
        say("=== Python %s (%s)" % (version, exe))
        # The Apache tests run the system's python3 under Apache whatever runs pytest: one run covers them.
        results[version] = run_suite(exe, argv[1:] + ["-q", "-m", "not apache"])
    for version, code in results.items():
        say("Python %s: %s" % (version, "passed" if code == 0 else "FAILED (exit %d)" % code))
    missing = sorted(set("3.%d" % m for m in range(8, 14)) - set(results))
    if missing:
        say("not found here: Python %s" % ", ".join(missing))
    return 0 if results and all(code == 0 for code in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
