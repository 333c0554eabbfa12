"""Private Apache instances for the deployment tests: their own ServerRoot, config, logs and port.

The system's Apache config is never read or touched. Debian's apache2 and
libapache2-mod-wsgi-py3 are installed when missing and this runs as root (tests/run.py does it
for CI). An instance copies the project into its document root exactly as a user would upload it.
"""

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HTTPD = "/usr/sbin/apache2"
MODULES = "/usr/lib/apache2/modules"
UPLOAD = ["listener.py", "config.ini", ".htaccess", "handlers"]  # what a user uploads
# A web server's PATH, not the test runner's: `#!/usr/bin/env python3` must find the system's python3.
SERVER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def missing():
    """Why Apache tests cannot run here, or None."""
    if not os.path.exists(HTTPD):
        return "apache2 is not installed (tests/run.py installs it as root)"
    if not os.path.exists(os.path.join(MODULES, "mod_wsgi.so")):
        return "libapache2-mod-wsgi-py3 is not installed (tests/run.py installs it as root)"
    if os.geteuid() != 0:
        return "the Apache tests start servers that switch to www-data: they run as root (as CI does)"
    return None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVER_HEADER = """
ServerRoot "{root}"
ServerName 127.0.0.1
Listen 127.0.0.1:{port}
PidFile "{root}/httpd.pid"
ErrorLog "{root}/error.log"
LogLevel warn
LoadModule mpm_{mpm}_module {modules}/mod_mpm_{mpm}.so
LoadModule authz_core_module {modules}/mod_authz_core.so
LoadModule mime_module {modules}/mod_mime.so
TypesConfig /etc/mime.types
User www-data
Group www-data
<Directory />
    AllowOverride None
    Require all denied
</Directory>
"""


def server_header(root, port, mpm, *loads):
    """What every private Apache here starts with (nothing served outside what a config grants),
    plus LoadModule lines for (name, file) pairs."""
    return SERVER_HEADER.format(root=root, port=port, mpm=mpm, modules=MODULES) + "".join(
        "LoadModule %s_module %s/%s\n" % (name, MODULES, file) for name, file in loads)


def modules(*names):
    return [(name, "mod_%s.so" % name) for name in names]


BASE_CONFIG = """
CustomLog "{root}/access.log" "%h \\"%r\\" %>s %b"
ScriptSock "{root}/cgid.sock"
WSGISocketPrefix "{root}/wsgi"
Timeout 60
MaxRequestWorkers 64
ThreadsPerChild 32
DocumentRoot "{root}/htdocs"
<Directory "{root}/htdocs">
    AllowOverride All
    Require all granted
</Directory>
"""

WSGI_CONFIG = """
WSGIDaemonProcess vbout processes=2 threads=16 display-name=vbout-wsgi home={app}
WSGIScriptAlias /wsgi/listener.py "{app}/listener.py" process-group=vbout application-group=%{{GLOBAL}}
<Directory "{app}">
    <Files "listener.py">
        Require all granted
    </Files>
</Directory>
<Location /wsgi>
    SetEnv VBOUT_LISTENER_CONFIG "{private}/config.ini"
</Location>
# Embedded mode: the same app inside Apache's own (threaded) processes.
WSGIScriptAlias /embedded/listener.py "{app}/listener.py" process-group=%{{GLOBAL}} application-group=%{{GLOBAL}}
<Location /embedded>
    SetEnv VBOUT_LISTENER_CONFIG "{private}/config.ini"
</Location>
"""


class Apache:
    """One Apache 2.4 on 127.0.0.1 serving the project as CGI at /private/vbout/listener.py and,
    with wsgi=True, through mod_wsgi daemon mode at /wsgi/listener.py (config outside the web root)."""

    def __init__(self, wsgi=False, config_text=None, extra=""):
        self.root = tempfile.mkdtemp(prefix="vbout-apache-")
        os.chmod(self.root, 0o755)
        self.port = free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        self.site = os.path.join(self.root, "htdocs", "private", "vbout")
        self.cgi_url = self.url + "/private/vbout/listener.py"
        self._upload(self.site, config_text)
        text = server_header(self.root, self.port, "event", *modules(
            "authz_host", "dir", "alias", "env", "headers", "cgid", "wsgi")) + BASE_CONFIG.format(root=self.root)
        if wsgi:
            self.app = os.path.join(self.root, "app")
            self.private = os.path.join(self.root, "private")
            self._upload(self.app, None, with_config=False)
            os.makedirs(self.private)
            with open(os.path.join(self.private, "config.ini"), "w") as f:
                f.write(config_text or "[listener]\n")
            self._give_to_server(self.private)
            self.wsgi_url = self.url + "/wsgi/listener.py"
            self.embedded_url = self.url + "/embedded/listener.py"
            text += WSGI_CONFIG.format(app=self.app, private=self.private)
        with open(os.path.join(self.root, "httpd.conf"), "w") as f:
            f.write(text + extra)
        self.start()

    def _upload(self, folder, config_text, with_config=True):
        os.makedirs(folder)
        for name in UPLOAD:
            source = os.path.join(ROOT, name)
            if os.path.isdir(source):
                shutil.copytree(source, os.path.join(folder, name),
                                ignore=shutil.ignore_patterns("__pycache__"))
            elif name != "config.ini" or with_config:
                shutil.copy2(source, folder)
        if with_config and config_text is not None:
            with open(os.path.join(folder, "config.ini"), "w") as f:
                f.write(config_text)
        self._give_to_server(folder)

    def _give_to_server(self, folder):
        """Files belong to the web server's user, as on a host where scripts run as their owner."""
        user = pwd.getpwnam("www-data")
        for parent in (os.path.dirname(folder), os.path.dirname(os.path.dirname(folder))):
            if parent.startswith(self.root):
                os.chmod(parent, 0o755)
        for dirpath, dirnames, filenames in os.walk(folder):
            os.chown(dirpath, user.pw_uid, user.pw_gid)
            for name in filenames:
                os.chown(os.path.join(dirpath, name), user.pw_uid, user.pw_gid)

    def apachectl(self, *args):
        env = {"PATH": SERVER_PATH, "LANG": "C", "APACHE_RUN_DIR": self.root, "APACHE_LOG_DIR": self.root}
        return subprocess.run([HTTPD, "-f", os.path.join(self.root, "httpd.conf")] + list(args),
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def start(self):
        result = self.apachectl("-k", "start")
        if result.returncode != 0:
            raise RuntimeError("apache2 did not start: %s\n%s" % (result.stdout, self.error_log()))
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("apache2 did not listen: %s" % self.error_log())

    def stop(self):
        self.apachectl("-k", "stop")
        pid_file = os.path.join(self.root, "httpd.pid")
        deadline = time.time() + 15
        while os.path.exists(pid_file) and time.time() < deadline:
            time.sleep(0.1)

    def close(self):
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def error_log(self):
        path = os.path.join(self.root, "error.log")
        return open(path, errors="replace").read() if os.path.exists(path) else ""

    def request(self, url, body=None, method=None, headers=None, timeout=60):
        """(status, headers, body bytes) of one HTTP request, errors included."""
        request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=timeout) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()


PASSENGER_CONFIG = """
PassengerRoot /usr/lib/ruby/vendor_ruby/phusion_passenger/locations.ini
PassengerDefaultRuby /usr/bin/ruby
PassengerInstanceRegistryDir "{root}"
PassengerDataBufferDir "{root}/buffer"
PassengerDefaultUser www-data
PassengerDisableSecurityUpdateCheck on
PassengerDisableAnonymousTelemetry on
DocumentRoot "{app}/public"
<Directory "{app}/public">
    Require all granted
</Directory>
# What cPanel's "Setup Python App" writes for: startup file listener.py, entry point application.
PassengerAppRoot "{app}"
PassengerAppType wsgi
PassengerStartupFile listener.py
PassengerPython /usr/bin/python3
"""


class Passenger(Apache):
    """Apache with Phusion Passenger running the uploaded folder as a Python app (listener.py, no shim)."""

    def __init__(self, config_text):
        self.root = tempfile.mkdtemp(prefix="vbout-passenger-")
        os.chmod(self.root, 0o755)
        self.port = free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        self.app = os.path.join(self.root, "vbout")
        self._upload(self.app, config_text)
        os.makedirs(os.path.join(self.app, "public"))
        os.makedirs(os.path.join(self.root, "buffer"))
        with open(os.path.join(self.root, "httpd.conf"), "w") as f:
            f.write(server_header(self.root, self.port, "event", *modules("passenger")) +
                    PASSENGER_CONFIG.format(root=self.root, app=self.app))
        self.start()
