#!/usr/bin/env python3
"""Vbout listener: receives Vbout's "Synch Contact to Third Party" calls and keeps them.

Standard library only, Python 3.8 to 3.13. Every call is checked against a secret, parsed
exactly as PHP's parse_str would, stored durably in SQLite before it is answered, and then
handed to the handlers switched on in config.ini.

    WSGI:  application                      (mod_wsgi, Passenger, gunicorn listener:application)
    CGI:   upload the folder, make listener.py executable, call listener.py?key=SECRET
    CLI:   python3 listener.py --help         (serve, init, check; deliver, retry, replay, spool
                                             for cron; events, stats, prune, forget, send-sample,
                                             learn, tail for the operator)
    Web:   listener.py?view=status           (the status page, once [listener] admin_secret is set)

config.ini is read from the file named by VBOUT_LISTENER_CONFIG (in the WSGI environ or the
process environment), else from config.ini beside this file; without one, the embedded
defaults apply. Relative paths in it are relative to the config file's folder.
"""

import os
import sys
import time
from itertools import count, repeat

__version__ = "1.0.0"

###############################################################################
# Constants and defaults ######################################################
###############################################################################

HERE = os.path.dirname(os.path.abspath(__file__))
# To keep config.ini outside the document root, put its full path here, for example
# DEFAULT_CONFIG = "/home/you/vbout-private/config.ini" (or set VBOUT_LISTENER_CONFIG).
DEFAULT_CONFIG = os.path.join(HERE, "config.ini")
CONFIG_ENV = "VBOUT_LISTENER_CONFIG"
SECRET_ENVIRON_KEY = "vbout_listener.secret"  # set by `serve` for a run without a configured secret
ALLOWED_METHODS = ("GET", "HEAD", "POST")
DRAIN_CAP = 16 * 1024 * 1024  # bytes a CGI reads and discards before answering an error (mod_cgid)
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1
STATUS_LINES = {
    200: "200 OK", 303: "303 See Other", 400: "400 Bad Request", 429: "429 Too Many Requests", 403: "403 Forbidden", 404: "404 Not Found",
    405: "405 Method Not Allowed", 411: "411 Length Required", 413: "413 Payload Too Large",
    415: "415 Unsupported Media Type", 500: "500 Internal Server Error",
    503: "503 Service Unavailable",
}



class _JSON:
    """json.dumps through the C encoder json itself uses, without importing json (and `re`)."""

    _encoders = {}

    @classmethod
    def dumps(cls, obj, ensure_ascii=False, sort_keys=False, spaced=False):
        key = (ensure_ascii, sort_keys, spaced)
        encode = cls._encoders.get(key)
        if encode is None:
            encode = cls._encoders[key] = cls._make(*key)
        return encode(obj)

    @staticmethod
    def _make(ensure_ascii, sort_keys, spaced):
        colon, comma = (": ", ", ") if spaced else (":", ",")
        try:
            from _json import encode_basestring, encode_basestring_ascii, make_encoder
        except ImportError:  # pragma: no cover - an interpreter without the C accelerator
            import json
            return lambda obj: json.dumps(obj, ensure_ascii=ensure_ascii, sort_keys=sort_keys,
                                          separators=(comma, colon))

        def default(obj):
            raise TypeError("%s is not JSON serializable" % type(obj).__name__)
        # markers=None: our trees have no cycles, and a shared markers dict is not thread-safe.
        c_encode = make_encoder(None, default, encode_basestring_ascii if ensure_ascii else encode_basestring,
                                None, colon, comma, sort_keys, False, True)
        return lambda obj: "".join(c_encode(obj, 0))


json_dumps = _JSON.dumps


def json_loads(text):
    import json  # loaded only where JSON is read: it pulls in `re`
    return json.loads(text)


def json_pretty(value):
    """Indented JSON for people (events show, the status page)."""
    import json
    return json.dumps(value, indent=2, ensure_ascii=False)

###############################################################################
# Errors ######################################################################
###############################################################################


class HTTPError(Exception):
    """A request that is answered with an error status and a short public message."""

    def __init__(self, status, message, headers=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or []


class LimitExceeded(HTTPError):
    """The body is over max_params or max_depth."""

    def __init__(self, message):
        super().__init__(400, message)


class ConfigError(Exception):
    """config.ini has a problem; the message names the file, section, key, value and the fix."""


class StorageError(Exception):
    """SQLite could not take the event."""


###############################################################################
# Config ######################################################################
###############################################################################

KEYS = {}  # (section, key) -> Key, in declaration order: drives validation, `check` and the docs


class Key:
    """One config key: its default, how its text becomes a value, and one line of help."""

    def __init__(self, section, name, default, parse, help):
        self.section, self.name, self.default, self.parse, self.help = section, name, default, parse, help


def _declare(name, default, parse, help, section="listener"):
    KEYS[(section, name)] = Key(section, name, default, parse, help)


def _parse_secret(text):
    tokens = [t.strip() for t in text.split(",")]
    tokens = [t for t in tokens if t]
    for t in tokens:
        if not t.isascii() or not t.isprintable() or len(t) < 16:
            raise ValueError("each secret must be at least 16 printable ASCII characters"
                             " (hint: run `python3 listener.py init` to write a strong one)")
        if "&" in t or "#" in t or "%" in t or " " in t:
            raise ValueError("a secret must not contain '&', '#', '%' or spaces: it travels in a URL"
                             " (hint: run `python3 listener.py init` to write a strong one)")
    return tuple(t.encode("ascii") for t in tokens)


def _parse_path(text):
    if not text.strip():
        raise ValueError("a path is needed here")
    return text.strip()


def _parse_optional_path(text):
    return text.strip() or None


def _int_parser(low, high, unit, hint):
    def parse(text):
        try:
            value = int(text.strip().replace("_", ""))
        except ValueError:
            raise ValueError("is not a whole number of %s (hint: %s)" % (unit, hint)) from None
        if not low <= value <= high:
            raise ValueError("must be between %d and %d %s (hint: %s)" % (low, high, unit, hint))
        return value
    return parse


def _seconds_parser(low, high, hint):
    def parse(text):
        try:
            value = float(text.strip())
        except ValueError:
            raise ValueError("is not a number of seconds (hint: %s)" % hint) from None
        if not low <= value <= high:
            raise ValueError("must be between %g and %g seconds (hint: %s)" % (low, high, hint))
        return value
    return parse


def _choice_parser(*choices):
    def parse(text):
        value = text.strip().lower()
        if value not in choices:
            raise ValueError("must be one of: %s" % ", ".join(choices))
        return value
    return parse


def _split_list(text):
    return [t.strip() for t in text.replace("\n", ",").split(",") if t.strip()]


def _parse_networks(text):
    items = [t.strip() for t in text.replace("\n", ",").split(",") if t.strip()]
    if not items:
        return ()
    import ipaddress  # only hosts that restrict addresses pay for it
    networks = []
    for item in items:
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError("%r is not an IP address or CIDR network (hint: 203.0.113.0/24, 2001:db8::/32)"
                             % item) from None
    return tuple(networks)


_declare("secret", "", _parse_secret,
         "The key Vbout sends as ?key=...; several comma-separated keys are all accepted"
         " (to rotate one without downtime). Empty: every call is refused with 503.")
_declare("database", "data/events.sqlite3", _parse_path,
         "The SQLite file that keeps every event; its folder is created private (0700).")
_declare("spool_file", "data/spool.jsonl", _parse_path,
         "Where a request goes when SQLite cannot take it; moved into the database later.")
_declare("durability", "full", _choice_parser("full", "normal"),
         "full: a 200 means the event survives a power cut (fsync per event)."
         " normal: faster, but the last events may be lost if the machine loses power.")
_declare("busy_timeout", "5", _seconds_parser(0, 60, "5 waits up to five seconds"),
         "Seconds to wait for another writer before the event is spooled instead.")
_declare("dedupe_window", "600", _int_parser(0, 30 * 86400, "seconds", "600 is ten minutes; 0 turns it off"),
         "Seconds within which a GET call with the same parameters and no transactionid is a duplicate.")
_declare("max_body_bytes", "1048576",
         _int_parser(1024, 1 << 30, "bytes", "1048576 is 1 MiB"),
         "Largest request body accepted; a larger one is answered 413.")
_declare("max_params", "1000", _int_parser(1, 1000000, "parameters", "1000 is PHP's max_input_vars"),
         "Most parameters in one body or query; more is answered 400 (PHP would drop them silently).")
_declare("max_depth", "64", _int_parser(1, 512, "levels", "64 is PHP's max_input_nesting_level"),
         "Deepest bracket nesting in a parameter name; deeper is answered 400 (PHP would drop it).")
_declare("allowed_ips", "", _parse_networks,
         "Optional comma-separated addresses or CIDR networks allowed to call; empty allows any.")
_declare("trusted_proxies", "", _parse_networks,
         "Proxies whose X-Forwarded-For is believed when checking allowed_ips.")
_declare("log_file", "", _parse_optional_path,
         "File for the listener's log (created 0600); empty logs to the web server's error log.")
_declare("log_level", "info", _choice_parser("debug", "info", "warning", "error"),
         "Least important level that is logged.")
_declare("admin_secret", "", lambda text: _parse_secret(text)[0] if _parse_secret(text) else b"",
         "Turns on the status page (listener.py?view=status) and is the key to sign in to it. Keep it"
         " different from secret; empty: the page is off.")
_declare("respond_with", "", lambda text: tuple(_split_list(text)),
         "Handler results added to the answer of an inline run, as HANDLER.KEY, comma-separated"
         " (for example crm.id): Vbout can map them back onto the contact.")

_declare("enabled", "", lambda text: tuple(_split_list(text)),
         "The handlers to run for each stored event, in order, comma-separated; each reads its"
         " own [handler:NAME] section.", section="handlers")
_declare("run", "inline", _choice_parser("inline", "deferred"),
         "inline: before the answer. deferred: stored as pending for `listener.py deliver` (cron).",
         section="handlers")
_declare("timeout", "10", _seconds_parser(0.1, 3600, "10 gives each handler ten seconds"),
         "Seconds a handler may take before its delivery counts as failed.", section="handlers")
_declare("max_attempts", "8", _int_parser(1, 1000, "attempts", "8 tries for about four hours"),
         "Tries before `listener.py retry` gives a failed delivery up.", section="handlers")
_declare("retry_delay", "60", _seconds_parser(1, 86400, "60 waits 1, 2, 4, 8... minutes"),
         "Seconds before the first retry; each further one waits twice as long (at most a day).",
         section="handlers")

# Every [handler:NAME] section may also hold these, beside the keys its module declares.
_declare("module", "", lambda text: text.strip(),
         "The module in handlers/ to run (default: NAME), so that one module can run twice.",
         section="handler:*")
_declare("run", "", lambda text: _choice_parser("inline", "deferred")(text) if text.strip() else None,
         "inline or deferred for this handler (default: [handlers] run).", section="handler:*")
_declare("timeout", "", lambda text: _seconds_parser(0.1, 3600, "10")(text) if text.strip() else None,
         "Seconds for this handler (default: [handlers] timeout).", section="handler:*")
_declare("only_if", "", lambda text: Condition(text) if text.strip() else None,
         "Run only for events where this holds: `contact.email`, `lead-status.label == Hot`,"
         " `fields.Country in US, CA`, `not fields.Unsubscribed`.", section="handler:*")


class Config:
    """The settings of one config file, checked, with paths made absolute."""

    def __init__(self, path, values):
        self.path = path
        self.folder = os.path.dirname(os.path.abspath(path)) if path else HERE
        for (section, name), value in values.items():
            if section == "listener":
                setattr(self, name, value)
        for name in ("database", "spool_file", "log_file"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, os.path.join(self.folder, os.path.expanduser(value)))
        self.handler_defaults = {name: values[("handlers", name)] for (sec, name) in KEYS if sec == "handlers"}
        self.handlers = []  # Handler instances, in the order of [handlers] enabled

    def handler(self, name):
        for handler in self.handlers:
            if handler.name == name:
                return handler
        return None

    @property
    def label(self):
        return self.path or "embedded defaults"


_config_cache = {}  # path -> ((mtime_ns, size), Config); replaced whole, never mutated in place


def load_config(path=None):
    """Read and check a config file (None: the embedded defaults); cached until the file changes."""
    if path is None:
        return _build_config(None, {})
    try:
        st = os.stat(path)
    except OSError:
        raise ConfigError("%s: cannot read the config file (hint: check the path in %s, or create it"
                          " from the config.ini shipped with the listener)" % (path, CONFIG_ENV)) from None
    stamp = (st.st_mtime_ns, st.st_size)
    cached = _config_cache.get(path)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    config = _build_config(path, _read_ini(path))
    _config_cache[path] = (stamp, config)
    return config


def _read_ini(path):
    """{section: {key: value}} of an INI file, as configparser reads it with interpolation off.

    A small reader of our own: configparser pulls in `re`, which every CGI request would pay
    for. `key = value` or `key: value` lines under `[section]` headers; `#` and `;` start a
    comment line; an indented line continues the value above it.
    """
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError("%s: is not UTF-8 text (hint: save it as UTF-8)" % path) from None
    sections, current, last, blanks = {}, None, None, 0
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        where = "%s line %d" % (path, number)
        if not stripped:
            blanks += 1  # kept inside a multi-line value when an indented line follows
            continue
        if stripped[0] in "#;":
            continue
        if line[0] in " \t" and last is not None:
            current[last] += "\n" * (blanks + 1) + stripped
            blanks = 0
            continue
        blanks = 0
        if stripped[0] == "[":
            name = stripped[1:-1].strip()
            if not stripped.endswith("]") or not name:
                raise ConfigError("%s: %r is not a section header (hint: write [listener])" % (where, stripped))
            if name in sections:
                raise ConfigError("%s: [%s] appears twice (hint: merge the two sections)" % (where, name))
            current, last = sections.setdefault(name, {}), None
            continue
        cut = min((i for i in (stripped.find("="), stripped.find(":")) if i > 0), default=-1)
        if cut < 0:
            raise ConfigError("%s: %r is not a setting (hint: write `key = value`)" % (where, stripped[:40]))
        if current is None:
            raise ConfigError("%s: a setting before any section (hint: put it under [listener])" % where)
        last = stripped[:cut].strip()
        if last in current:
            raise ConfigError("%s: %s is set twice in one section (hint: keep one)" % (where, last))
        current[last] = stripped[cut + 1:].strip()
    return sections


def _build_config(path, sections):
    label = path or "embedded defaults"
    for name in sections:
        if name not in ("listener", "handlers") and not (
                name.startswith("handler:") and _is_name(name[len("handler:"):])):
            raise ConfigError("%s [%s]: unknown section (hint: the sections are [listener], [handlers]"
                              " and [handler:NAME])" % (label, name))
    values = {}
    for section in ("listener", "handlers"):
        values.update(_check_section(label, section, section, dict(sections.get(section, {}))))
    config = Config(path, values)
    enabled = config.handler_defaults["enabled"]
    for position, name in enumerate(enabled):
        where = "%s [handlers] enabled" % label
        if not _is_name(name):
            raise ConfigError("%s: %r is not a handler name (hint: letters, digits and _; a module in"
                              " handlers/ or a [handler:NAME] section)" % (where, name))
        if name in enabled[:position]:
            raise ConfigError("%s: handler %r is listed twice (hint: list it once; to run a module"
                              " twice, give a second [handler:NAME] section `module = %s`)" % (where, name, name))
        config.handlers.append(Handler(config, name, dict(sections.get("handler:" + name, {}))))
    if config.admin_secret and config.admin_secret in config.secret:
        raise ConfigError("%s [listener] admin_secret: (value hidden) is also in secret (hint: the status page"
                          " needs a key of its own: Vbout's must never open it)" % label)
    for item in config.respond_with:
        handler_name, dot, key = item.partition(".")
        handler = config.handler(handler_name)
        where = "%s [listener] respond_with: %r" % (label, item)
        if not dot or not key:
            raise ConfigError("%s is not HANDLER.KEY (hint: crm.id)" % where)
        if handler is None or handler.run != "inline":
            raise ConfigError("%s names no inline handler (hint: add %r to [handlers] enabled, run inline)"
                              % (where, handler_name))
        if handler_name in ("ok", "event_id", "duplicate", "spooled", "status", "error"):
            raise ConfigError("%s would overwrite part of the answer (hint: rename the handler)" % where)
    return config


def _check_section(label, section, declared, given):
    """{(section, key): value} for one section: declared keys parsed, unknown keys refused."""
    values = {}
    for (sec, name), key in KEYS.items():
        if sec != declared:
            continue
        text = given.pop(name, key.default)
        try:
            values[(section, name)] = key.parse(text)
        except ValueError as e:
            raise ConfigError("%s [%s] %s: %s %s" % (label, section, name, _quote_value(name, text), e)) from None
    for name in given:
        raise ConfigError("%s [%s] %s: unknown key (hint: %s)" % (
            label, section, name, _known_keys_hint(name, [n for (s, n) in KEYS if s == declared])))
    return values


def _known_keys_hint(name, known):
    close = [n for n in known if _similar(n, name)]
    return ("did you mean %r?" % close[0]) if close else ("the keys are: " + ", ".join(known))


def _is_name(text):
    return text.isidentifier() and text.isascii()


def _quote_value(name, text):
    if name.endswith("secret"):
        return "(value hidden)"
    return repr(text)


def _similar(a, b):
    a, b = a.lower(), b.lower()
    return a == b or (abs(len(a) - len(b)) <= 2 and len(set(a) ^ set(b)) <= 2) or a in b or b in a


def config_path(environ=None):
    """The config file to use: VBOUT_LISTENER_CONFIG from the WSGI environ, then the process, then beside us."""
    path = (environ or {}).get(CONFIG_ENV) or os.environ.get(CONFIG_ENV)
    if path:
        return path
    return DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None


###############################################################################
# Form parsing ################################################################
###############################################################################

_STR = "str"  # marks a valid, non-numeric array key in the key memo


def parse_form(body, max_params=1000, max_depth=64, charset="utf-8"):
    """Parse an application/x-www-form-urlencoded body exactly as PHP 8's parse_str does.

    Returns json.loads(json_encode(parse_str(body))): dicts with string keys, and lists only where
    PHP's array has the keys 0..n-1 in insertion order. Two deliberate differences: top-level
    names are kept as sent (PHP turns '.', ' ' and an unclosed '[' into '_'), and the top level
    is always a dict. More than max_params parameters, or brackets nested deeper than
    max_depth, raise LimitExceeded (PHP would silently drop data).
    """
    if isinstance(body, str):
        body = body.encode("utf-8")
    if len(body) < 65536:
        return _build_tree(_form_pairs(body, charset, max_params), max_depth)
    # A large body makes tens of thousands of arrays, none in a reference cycle: the cyclic
    # garbage collector would scan them again and again while they are built, for nothing.
    import gc
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _build_tree(_form_pairs(body, charset, max_params), max_depth)
    finally:
        if collecting:
            gc.enable()


def _form_pairs(body, charset, max_params):
    """Split and percent-decode a form body into (name, separator, value) triples."""
    if not body:
        return []
    # The body's raw '&' and '=' in order: '=&=&...=' when every pair is 'name=value'.
    separators = body.translate(None, _NOT_SEPARATORS)
    # Only '&' separates (php_default_treat_data, arg_separator.input); PHP's strtok skips empty tokens.
    if separators.count(b"&") >= max_params:
        tokens = body.split(b"&")
        if len(tokens) - tokens.count(b"") > max_params:
            raise LimitExceeded("the body has more than %d parameters (max_params)" % max_params)
    seps = _free_bytes(body) if _whole_decode_ok(charset) else None
    if seps is not None:
        # Each pair has one raw '=': then one split on both separators gives name, value, name, ...
        regular = separators == b"=" + b"&=" * (len(separators) // 2)
        decoded = _decode_whole(body, (seps[0], seps[0]) if regular else seps)
        if decoded is not None:
            text = decoded.decode(charset, "replace")
            del decoded  # each copy of a large body is let go as soon as the next one exists
            if regular:
                items = text.split(chr(seps[0]))
                del text
                return zip(items[0::2], repeat("="), items[1::2])
            tokens = text.split(chr(seps[0]))
            del text
            equals = chr(seps[1])
            if b"==" in separators:
                # A value holds a raw '=' (b=c=d): only each pair's first one separates.
                return [(n, "=", v.replace(equals, "=")) if e else (n, "", v)
                        for n, e, v in map(str.partition, tokens, repeat(equals))]
            # Lazily, in C: the tree keeps the values while names and tokens go (peak memory).
            return map(str.partition, tokens, repeat(equals))
    # The exact path, for invalid '%' escapes or a charset that is not one byte per ASCII char.
    from urllib.parse import unquote_to_bytes  # the same rules as php_url_decode once '+' is done
    triples = []
    for token in body.replace(b"+", b" ").split(b"&"):
        if token:
            name, sep, value = token.partition(b"=")
            triples.append((unquote_to_bytes(name).decode(charset, "replace"), "=" if sep else "",
                            unquote_to_bytes(value).decode(charset, "replace")))
    return triples


# Every byte but '&' and '=': what is left of a body is its pairs' separators, '=' twice in a row
# where a pair holds more than one.
_NOT_SEPARATORS = bytes(range(38)) + bytes(range(39, 61)) + bytes(range(62, 256))
_whole_decode_cache = {}


def _whole_decode_ok(charset):
    """True when the charset maps every byte below 0x80 to itself, one byte to one character."""
    ok = _whole_decode_cache.get(charset)
    if ok is None:
        try:
            ascii_ok = bytes(range(128)).decode(charset) == bytes(range(128)).decode("latin-1")
            single = len(bytes(range(128, 256)).decode(charset, "replace")) == 128
            ok = ascii_ok and (single or charset.lower().replace("_", "-") in ("utf-8", "utf8"))
        except (LookupError, UnicodeDecodeError):
            ok = False
        _whole_decode_cache[charset] = ok
    return ok


def _free_bytes(body):
    """Two control bytes that the decoded body cannot hold: absent raw and as a %XX escape."""
    # Searching for '%..' is slow in a body full of '%': one search for '%0' (or '%1') answers
    # for all of its candidates at once when, as usual, the body has no such escape at all.
    escaped = {}
    found = []
    for b, raw, high, lower, upper in _CANDIDATES:
        if raw in body:
            continue
        if high not in escaped:
            escaped[high] = high in body
        if escaped[high] and (lower in body or upper in body):
            continue
        found.append(b)
        if len(found) == 2:
            return tuple(found)
    return None


# Control bytes that a body may lack: (byte, itself, the start of its escape, its escape in both cases).
_CANDIDATES = [(b, bytes((b,)), b"%%%d" % (b >> 4), b"%%%02x" % b, b"%%%02X" % b)
               for b in (1, 2, 3, 4, 5, 6, 7, 8, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25)]


def _decode_whole(body, seps):
    """Percent-decode the whole body in one C call: None when it holds an invalid escape.

    One translate pass makes it quoted-printable: '+' a space, '&' seps[0], a raw '=' seps[1]
    (so that a decoded %3D can never split a name from its value) and '%' the escape '=';
    raw CR and LF become escapes so that no soft line break can occur. binascii.a2b_qp then
    decodes every '=XX'. An invalid escape would come out as '=' instead of PHP's literal '%':
    the length check sees it and the caller takes the exact path.
    """
    from binascii import a2b_qp
    table = _QP_TABLES.get(seps)
    if table is None:
        table = _QP_TABLES[seps] = bytes.maketrans(b"+&=%", b" " + bytes(seps) + b"=")  # at most 20 x 20
    data = body.translate(table)
    if b"\r" in data or b"\n" in data:
        data = data.replace(b"\r", b"=0D").replace(b"\n", b"=0A")
    out = a2b_qp(data)
    if len(out) != len(data) - 2 * data.count(b"="):
        return None
    return out


_QP_TABLES = {}  # (seps[0], seps[1]) -> _decode_whole's translation table


def _php_int_key(key):
    """The integer PHP's symbol table makes of a key, or None (ZEND_HANDLE_NUMERIC_STR)."""
    digits = key[1:] if key[:1] == "-" else key
    if not digits or not digits.isascii() or not digits.isdigit():
        return None
    if digits[0] == "0" and len(key) > 1:  # "01", "-0", "-01" stay strings
        return None
    if len(digits) > 19:
        return None
    value = int(key)
    return value if INT64_MIN <= value <= INT64_MAX else None


def _key_kind(key):
    """For the fast path: False for an append ('' or ' '), a ']' or a NUL; else its int or _STR."""
    if key == "" or key == " " or "]" in key or "\x00" in key:
        return False
    number = _php_int_key(key)
    return _STR if number is None else number


def _kind_of(key):
    """_key_kind(key), remembered across parses (Vbout's keys repeat from call to call)."""
    kind = _KINDS.get(key)
    if kind is None:
        kind = _key_kind(key)
        if len(_KINDS) < _MEMO_SIZE:  # a large body's many keys are not worth keeping (memory)
            _KINDS[key] = kind
    return kind


_MEMO_SIZE = 1000  # entries in each parsing memo (_KINDS, _NAMES): Vbout's keys and names are far fewer
_KINDS = {}


class _Tree:
    """PHP's array building (php_register_variable_ex), with a cache of the arrays reached so far.

    The cache maps a name's prefix, such as 'fields[0]', to the array it leads to, so that
    'fields[0][name]' costs one lookup. Only prefixes made of plain keys (no append) are kept,
    and the whole cache is dropped when an array is replaced by a scalar.
    """

    def __init__(self, max_depth):
        self.top = {}
        self.max_depth = max_depth
        self.next_index = {}  # id(array) -> nNextFreeElement, for arrays that got an integer key
        self.arrays = {}  # prefix -> array
        self.detached = []  # replaced arrays, kept alive so that their ids stay unique
        self.created = []  # (array, parent, key) for every array made, in order

    def set(self, array, key, value, number):
        """array[key] = value as zend_symtable_update: an existing key keeps its place."""
        if number is not None:
            nxt = self.next_index.get(id(array))
            if nxt is None or number >= nxt:  # nNextFreeElement starts at ZEND_LONG_MIN
                self.next_index[id(array)] = number + 1 if number < INT64_MAX else INT64_MAX
        old = array.get(key)
        if old.__class__ is dict and value is not old:
            self.detached.append(old)
            self.arrays.clear()
        array[key] = value

    def append(self, array, value):
        """array[] = value as zend_hash_next_index_insert: the key used, or None when PHP refuses."""
        number = self.next_index.get(id(array), 0)
        key = str(number)
        if key in array:  # only past INT64_MAX: "the next element is already occupied"
            return None
        self.set(array, key, value, number)
        return key

    def child(self, array, key, number):
        """The array at array[key]; a missing key or a scalar becomes an empty array in place."""
        node = array.get(key)
        if node.__class__ is not dict:
            node = {}
            self.set(array, key, node, number)
            self.created.append((node, array, key))
        return node

    def add(self, name, value):
        """Register one variable the exact way, remembering the prefixes it reached."""
        if "\x00" in name:
            name = name[:name.index("\x00")]  # the name is a C string: %00 ends it
        name = name.lstrip(" ")  # "ignore leading spaces in the variable name"
        pos = name.find("[")
        if pos < 0:
            if name:
                self.set(self.top, name, value, None)
            return
        if pos == 0:
            return  # an empty variable name is dropped
        array, key, number = self.top, name[:pos], None
        depth, plain = 0, True
        while True:
            depth += 1
            if depth > self.max_depth:
                raise LimitExceeded("a parameter name is nested deeper than %d levels (max_depth)"
                                    % self.max_depth)
            start = pos + 1
            p = start + 1 if name[start:start + 1] == " " else start
            if name[p:p + 1] == "]":
                index, close = None, p  # '[]' and '[ ]' append
            else:
                close = name.find("]", p)
                if close < 0:
                    # An unclosed group is not an index. At the top the whole name becomes the
                    # variable (PHP mangles it to 'a_b', we keep it as sent); deeper, it is ignored.
                    if array is self.top:
                        key = name
                    break
                index = name[start:close]
            if key is None:
                node = {}
                appended = self.append(array, node)
                if appended is None:
                    return
                self.created.append((node, array, appended))
                plain = False
            else:
                node = self.child(array, key, number)
                if plain and depth < self.max_depth:
                    self.arrays[name[:pos]] = node
            array, key = node, index
            number = None if index is None else _php_int_key(index)
            pos = close + 1
            if name[pos:pos + 1] != "[":
                break  # text after a closed group ends the name: a[b]c[d] is a[b]
        if key is None:
            self.append(array, value)
        else:
            self.set(array, key, value, number)

    def container(self, prefix):
        """The array a prefix leads to, found from its parent's cached array; None if not plain."""
        split = _NAMES.get(prefix)  # a prefix splits like a name: 'fields[0]' is 'fields', '0'
        if split is None:
            split = _split_name(prefix)
        # Its groups, or more when a key holds '[' (a[x[y]): the name's last group must fit under
        # max_depth, and when in doubt add() decides exactly.
        if split is False or prefix.count("[") >= self.max_depth:
            return None
        parent_prefix, key, kind = split
        parent = self.arrays.get(parent_prefix)
        if parent is None:
            # A variable name reached for the first time ('fields' of 'fields[0][id]') is made
            # here as add() would make it, unless add() has something to strip from it first.
            if "[" in parent_prefix or parent_prefix[0] == " " or "\x00" in parent_prefix:
                return None
            parent = self.arrays[parent_prefix] = self.child(self.top, parent_prefix, None)
        node = parent.get(key)
        if node.__class__ is not dict:  # child() and set(), inline: this runs for every new list item
            node = {}
            if kind is not _STR:
                nxt = self.next_index.get(id(parent))
                if nxt is None or kind >= nxt:
                    self.next_index[id(parent)] = kind + 1 if kind < INT64_MAX else INT64_MAX
            parent[key] = node  # what was there is no array: no cached prefix leads into it
            self.created.append((node, parent, key))
        self.arrays[prefix] = node
        return node


def _split_name(name):
    """(prefix, last key, its kind) of '<prefix>[<plain key>]', else False; remembered in _NAMES."""
    split = False
    j = name.rfind("[")
    if j > 0 and name[-1] == "]":
        last = name[j + 1:-1]
        kind = _kind_of(last)
        if kind is not False:
            split = name[:j], last, kind
    if len(_NAMES) < _MEMO_SIZE:
        _NAMES[name] = split
    return split


def _build_tree(triples, max_depth):
    """The PHP array made of decoded (name, separator, value) triples, as parse_form returns it."""
    tree = _Tree(max_depth)
    arrays, names, set_, add = tree.arrays, _NAMES, tree.set, tree.add
    for name, _, value in triples:
        # The fast path: name is '<cached prefix>[<plain key>]'.
        split = names.get(name)
        if split is None:
            split = _split_name(name)
        if split is not False:
            prefix, last, kind = split
            array = arrays.get(prefix)
            if array is None:
                array = tree.container(prefix)
            if array is not None:
                if kind is _STR and last not in array:
                    array[last] = value
                else:
                    set_(array, last, value, None if kind is _STR else kind)
                continue
        add(name, value)
    _to_json_shape(tree)
    if len(names) >= _MEMO_SIZE or len(_KINDS) >= _MEMO_SIZE:
        names.clear()  # filled by a large body: start again with the next body's (Vbout's) names
        _KINDS.clear()
    return tree.top


_NAMES = {}  # name -> (prefix, last key, its kind) or False: Vbout's names repeat from call to call


def _to_json_shape(tree):
    """Turn arrays whose keys are 0..n-1 in order into lists, as json_encode does.

    Children were made after their parents: going backwards converts a child before the
    parent whose values it is copied into.
    """
    next_index = tree.next_index
    for array, parent, key in reversed(tree.created):
        n = len(array)
        if (n == 0 or next_index.get(id(array)) == n) and parent.get(key) is array:
            if list(array) == (_INDEX_KEYS[:n] if n <= len(_INDEX_KEYS) else [str(i) for i in range(n)]):
                parent[key] = list(array.values())


_INDEX_KEYS = [str(i) for i in range(64)]  # the keys of the lists most calls hold, made once


def parse_query(query, max_params=1000, max_depth=64):
    """Parse a GET query string (Vbout's shortcode mode) into the same tree, without `key`."""
    tree = parse_form(query.encode("latin-1") if isinstance(query, str) else query, max_params, max_depth)
    tree.pop("key", None)
    return tree


def parse_json(body, max_params=1000, max_depth=64, charset="utf-8"):
    """Parse a JSON body whose top is an object, held to the same limits as a form."""
    import json
    try:
        tree = json.loads(body.decode(charset, "replace"))
    except (ValueError, RecursionError):
        raise HTTPError(400, "The body is not valid JSON.") from None
    if not isinstance(tree, dict):
        raise HTTPError(400, "The JSON body must be an object.")
    params, stack = 0, [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            raise LimitExceeded("the JSON body is nested deeper than %d levels (max_depth)" % max_depth)
        for value in (node.values() if isinstance(node, dict) else node):
            if isinstance(value, (dict, list)):
                stack.append((value, depth + 1))
            else:
                params += 1
    if params > max_params:
        raise LimitExceeded("the body has more than %d parameters (max_params)" % max_params)
    return tree


def parse_multipart(body, content_type, max_params=1000, max_depth=64, charset="utf-8"):
    """Parse a multipart/form-data body's fields into the same tree (files are left out, as PHP's $_POST)."""
    from email.parser import BytesParser
    from email.policy import HTTP
    if "boundary=" not in content_type.lower():
        raise HTTPError(400, "The multipart body has no boundary.")
    head = b"Content-Type: " + content_type.encode("latin-1", "replace") + b"\r\n\r\n"
    message = BytesParser(policy=HTTP).parsebytes(head + body)
    if not message.is_multipart() or message.defects:
        raise HTTPError(400, "The multipart body is malformed.")
    triples = []
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name is None or part.get_param("filename", header="content-disposition") is not None:
            continue
        payload = part.get_payload(decode=True) or b""
        part_charset = part.get_content_charset() or charset
        try:
            value = payload.decode(part_charset, "replace")
        except LookupError:
            value = payload.decode(charset, "replace")
        triples.append((str(name), "=", value))
    if len(triples) > max_params:
        raise LimitExceeded("the body has more than %d parameters (max_params)" % max_params)
    return _build_tree(triples, max_depth)


def _content_type(value):
    """('application/json', {'charset': 'utf-8'}) from a Content-Type header."""
    kind, _, rest = (value or "").partition(";")
    params = {}
    for item in rest.split(";"):
        k, eq, v = item.partition("=")
        if eq:
            params[k.strip().lower()] = v.strip().strip('"')
    return kind.strip().lower(), params


###############################################################################
# Storage #####################################################################
###############################################################################

MIGRATIONS = [
    # 1: the events and what each handler did with them.
    [
        """CREATE TABLE events (
            id INTEGER PRIMARY KEY,
            transaction_id TEXT,
            received_at TEXT NOT NULL,
            method TEXT NOT NULL,
            content_type TEXT,
            remote_addr TEXT,
            payload TEXT NOT NULL,
            raw_body BLOB,
            contact_email TEXT,
            contact_id TEXT,
            dedupe_key TEXT,
            spool_id TEXT
        )""",
        # Partial indexes: most events have no dedupe_key or spool_id, and they cost nothing there.
        "CREATE UNIQUE INDEX events_transaction_id ON events (transaction_id) WHERE transaction_id IS NOT NULL",
        "CREATE UNIQUE INDEX events_spool_id ON events (spool_id) WHERE spool_id IS NOT NULL",
        "CREATE INDEX events_dedupe_key ON events (dedupe_key, received_at) WHERE dedupe_key IS NOT NULL",
        "CREATE INDEX events_received_at ON events (received_at)",
        "CREATE INDEX events_contact_email ON events (contact_email)",
        """CREATE TABLE deliveries (
            event_id INTEGER NOT NULL REFERENCES events (id) ON DELETE CASCADE,
            handler TEXT NOT NULL,
            status TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            last_error TEXT,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (event_id, handler)
        ) WITHOUT ROWID""",
        "CREATE INDEX deliveries_status ON deliveries (status, updated_at)",
    ],
    # 2: what handlers need to retry with backoff, claim work, and answer with a result.
    [
        "ALTER TABLE deliveries ADD COLUMN duration_ms REAL",
        "ALTER TABLE deliveries ADD COLUMN next_attempt_at TEXT",
        "ALTER TABLE deliveries ADD COLUMN claimed_by TEXT",
        "ALTER TABLE deliveries ADD COLUMN result TEXT",
    ],
    # 3: what the operator's tools count and remember.
    [
        "ALTER TABLE events ADD COLUMN repeats INTEGER NOT NULL DEFAULT 0",  # duplicate calls of this event
        "CREATE TABLE admin_attempts (address TEXT PRIMARY KEY, failures INTEGER NOT NULL, since TEXT NOT NULL)"
        " WITHOUT ROWID",
    ],
]

EVENT_COLUMNS = ("transaction_id", "received_at", "method", "content_type", "remote_addr", "payload",
                 "raw_body", "contact_email", "contact_id", "dedupe_key", "spool_id")
_INSERT_EVENT = "INSERT INTO events (%s) VALUES (%s)" % (", ".join(EVENT_COLUMNS), ", ".join("?" * len(EVENT_COLUMNS)))

try:
    from _thread import _local as _ThreadLocal, allocate_lock as _allocate_lock  # without importing threading
except ImportError:  # pragma: no cover
    from threading import local as _ThreadLocal, Lock as _allocate_lock

SQLITE_MINIMUM = (3, 8, 3)  # partial indexes (3.8.0) and WITHOUT ROWID tables (3.8.2)
LOCK_LOOK = 0.02  # seconds SQLite's busy handler waits before while_locked() looks again

_connections = _ThreadLocal()  # each thread keeps its own connections: never shared across threads


def utc_now(t=None):
    """ISO-8601 UTC with microseconds: sorts as text."""
    t = time.time() if t is None else t
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + (".%06dZ" % int((t % 1) * 1e6))


def _private_folder(folder):
    if not os.path.isdir(folder):
        os.makedirs(folder, mode=0o700, exist_ok=True)


def connect(config):
    """This thread's connection to the events database, reopened if the file was deleted or replaced."""
    path = config.database
    cache = getattr(_connections, "by_path", None)
    if cache is None:
        cache = _connections.by_path = {}
    kept = cache.get(path)
    try:
        st = os.stat(path)
        identity = (st.st_dev, st.st_ino)
    except FileNotFoundError:
        identity = None
    if kept is not None:
        if kept[1] == identity:
            return kept[0]
        del cache[path]
        try:
            kept[0].close()
        except Exception:
            pass
    conn = _open(config, path, identity is None)
    st = os.stat(path)
    cache[path] = (conn, (st.st_dev, st.st_ino))
    return conn


def close_connections():
    """Close this thread's connections."""
    for conn, _ in getattr(_connections, "by_path", {}).values():
        conn.close()
    _connections.by_path = {}


def _open(config, path, create):
    try:
        import sqlite3
    except ImportError:
        raise StorageError("this Python has no sqlite3 module: events are spooled until it has one") from None
    if sqlite3.sqlite_version_info < SQLITE_MINIMUM:
        raise StorageError("SQLite %s is too old (the listener needs %s or newer): events are spooled"
                           % (sqlite3.sqlite_version, ".".join(map(str, SQLITE_MINIMUM))))
    if create:
        # Made here first so that the file (and the -wal and -shm that copy its mode) is private.
        _private_folder(os.path.dirname(path))
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass
    try:
        conn = sqlite3.connect(path, timeout=min(config.busy_timeout, LOCK_LOOK), isolation_level=None,
                               factory=_connection_type())
    except sqlite3.Error as e:
        raise StorageError("cannot open the database: %s" % e) from None
    conn.busy_timeout = config.busy_timeout
    try:
        # Each pragma can meet a lock while other processes make the same new file at once;
        # the migration waits in its own transaction.
        while_locked(conn, lambda: _prepare(conn, config))
        migrate(conn)
    except sqlite3.Error as e:
        conn.close()
        raise StorageError("cannot prepare the database: %s" % e) from None
    return conn


def _prepare(conn, config):
    if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=%s" % ("FULL" if config.durability == "full" else "NORMAL"))
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA cache_size=-1024")  # KiB: one event at a time needs little
    # Each connection's cache goes stale whenever another one writes: reading pages through a
    # memory map instead of read() calls is what keeps concurrent writers cheap.
    conn.execute("PRAGMA mmap_size=268435456")


_Connection = None


def _connection_type():
    """sqlite3.Connection with the busy_timeout its writers wait for, made on first use."""
    global _Connection
    if _Connection is None:
        import sqlite3

        class Connection(sqlite3.Connection):
            busy_timeout = 0.0  # seconds: how long while_locked() keeps trying

        _Connection = Connection
    return _Connection


def while_locked(conn, attempt):
    """attempt() again every few milliseconds while another connection holds the lock, for up to
    conn.busy_timeout seconds in all.

    SQLite's own busy handler sleeps longer and longer between looks, up to 100 ms: under steady
    writes from several processes a waiter keeps waking while someone else holds the lock and runs
    out of time although the lock was free most of it. Measured with 12 processes writing 1,200
    events in about a second, busy_timeout 0.1 s: 11 to 15 waits ran out per run, none with this
    loop; with 24 processes the longest wait went from 0.75-1.0 s to 0.2-0.5 s. So each
    connection's own handler waits only LOCK_LOOK seconds, and this loop looks again soon after.
    """
    from sqlite3 import OperationalError
    deadline = time.monotonic() + getattr(conn, "busy_timeout", 0)
    while True:
        try:
            return attempt()
        except OperationalError as e:
            if "locked" not in str(e) or time.monotonic() >= deadline:
                raise
        time.sleep(0.001)


def migrate(conn):
    """Bring the schema to the newest version, each migration in its own transaction."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version == len(MIGRATIONS):
        return
    if version > len(MIGRATIONS):
        raise StorageError("the database was made by a newer listener (schema %d)" % version)
    with transaction(conn):
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        for number in range(version, len(MIGRATIONS)):
            for statement in MIGRATIONS[number]:
                conn.execute(statement)
        conn.execute("PRAGMA user_version=%d" % len(MIGRATIONS))


class transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on error: the one way writes are made."""

    def __init__(self, conn):
        self.conn = conn

    def __enter__(self):
        while_locked(self.conn, lambda: self.conn.execute("BEGIN IMMEDIATE"))
        return self.conn

    def __exit__(self, kind, value, tb):
        if kind is None:
            self.conn.execute("COMMIT")
        else:
            try:
                self.conn.execute("ROLLBACK")
            except Exception:
                pass
        return False


def store_event(conn, row, dedupe_window=0, deliveries=(), claim=None):
    """Insert an event row unless it repeats one, in a transaction of its own: (event_id, duplicate).

    deliveries: [(handler, status)] rows made in the same transaction, so that an event is never
    stored without the record of what its handlers still have to do.
    """
    with transaction(conn):
        return _insert_event(conn, row, dedupe_window, deliveries, claim)


def _insert_event(conn, row, dedupe_window, deliveries, claim):
    """store_event's statements, inside a transaction the caller holds."""
    import sqlite3
    if row.get("transaction_id") is None and row.get("dedupe_key") is not None and dedupe_window > 0:
        since = utc_now(time.time() - dedupe_window)
        found = conn.execute("SELECT id FROM events WHERE dedupe_key IS NOT NULL AND dedupe_key = ?"
                             " AND received_at >= ?"
                             " ORDER BY id DESC LIMIT 1", (row["dedupe_key"], since)).fetchone()
        if found:
            conn.execute("UPDATE events SET repeats = repeats + 1 WHERE id = ?", found)
            return found[0], True
    try:
        cursor = conn.execute(_INSERT_EVENT, [row.get(c) for c in EVENT_COLUMNS])
    except sqlite3.IntegrityError:
        # transaction_id and spool_id are unique: the event is already stored (one statement
        # fewer for every new event than looking first).
        for column in ("spool_id", "transaction_id"):  # a spool record imported again is no repeat
            if row.get(column) is not None:
                found = conn.execute("SELECT id FROM events WHERE %s = ?" % column, (row[column],)).fetchone()
                if found:
                    if column == "transaction_id":
                        conn.execute("UPDATE events SET repeats = repeats + 1 WHERE id = ?", found)
                    return found[0], True
        raise
    if deliveries:
        now = utc_now()
        conn.executemany("INSERT INTO deliveries (event_id, handler, status, attempts, updated_at, claimed_by)"
                         " VALUES (?, ?, ?, 0, ?, ?)", [(cursor.lastrowid, handler, status, now,
                                                         claim if status == "running" else None)
                                                        for handler, status in deliveries])
    return cursor.lastrowid, False


class _Writer:
    """Group commit: the requests of one process that store at the same moment share one
    transaction, and so one wait for the write lock and one fsync.

    The first request to arrive writes its row at once. Requests that arrive while it does
    queue up, and the first of them then writes every row queued by then, its own included.
    Each request is answered only after the transaction that holds its row has committed; when
    that transaction fails, every request in it gets the error (and spools its own row).
    Under CGI, one request per process, a request always writes alone.
    """

    def __init__(self):
        self.mutex = _allocate_lock()
        self.queue = []  # [_Waiter] not yet written
        self.busy = False  # a request is writing

    def store(self, config, row, deliveries, claim):
        """(store_event() for this request's row, whether this request wrote the transaction)."""
        me = _Waiter((row, config.dedupe_window, deliveries, claim))
        with self.mutex:
            self.queue.append(me)
            lead, self.busy = not self.busy, True
        if not lead:
            me.wake.acquire()  # released with this row's outcome, or for this request to write next
            if me.outcome is not None:
                return me.result(), False
        with self.mutex:
            batch, self.queue = self.queue, []
        outcomes = None
        try:
            conn = connect(config)
            with transaction(conn):
                outcomes = [_insert_event(conn, *waiter.args) for waiter in batch]
        except Exception as e:
            outcomes = [e] * len(batch)
        finally:
            if outcomes is None:  # not an Exception (the process is being stopped): no waiter may hang
                outcomes = [StorageError("the request that wrote this event was interrupted")] * len(batch)
            with self.mutex:
                following = self.queue[0] if self.queue else None
                self.busy = following is not None
            if following is not None:
                following.wake.release()
            for waiter, outcome in zip(batch, outcomes):
                waiter.outcome = outcome
                if waiter is not me:
                    waiter.wake.release()
        return me.result(), True


class _Waiter:
    __slots__ = ("args", "wake", "outcome")

    def __init__(self, args):
        self.args = args
        self.wake = _allocate_lock()
        self.wake.acquire()
        self.outcome = None  # (event_id, duplicate), or the exception that stopped the transaction

    def result(self):
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


_writers = {}  # database path -> its _Writer in this process
_writers_mutex = _allocate_lock()


def _writer(path):
    writer = _writers.get(path)
    if writer is None:
        with _writers_mutex:
            writer = _writers.setdefault(path, _Writer())
    return writer


def _after_fork():
    """In a forked child (Passenger and gunicorn --preload fork after importing the listener): no
    queue or lock of the parent's threads, and request ids of its own."""
    global _writers_mutex
    _writers_mutex = _allocate_lock()
    _writers.clear()
    _seed_request_ids()


def save(config, row):
    """Store an event durably: in SQLite, else in the spool. Returns (answer fields, problem, claim).

    Inline handlers' deliveries are stored as 'running', claimed by this request; deferred ones
    as 'pending', for `listener.py deliver`.
    """
    try:
        from sqlite3 import Error as SQLiteError
    except ImportError:  # a Python built without sqlite3: connect() says so, and the spool takes the event
        SQLiteError = StorageError
    claim = os.urandom(8).hex() if config.handlers else None
    deliveries = [(h.name, "running" if h.run == "inline" else "pending") for h in config.handlers]
    try:
        (event_id, duplicate), wrote = _writer(config.database).store(config, row, deliveries, claim)
    except (SQLiteError, StorageError, OSError) as e:
        spool_append(config, row)  # raises OSError when the spool cannot take it either
        return {"event_id": None, "duplicate": False, "spooled": True}, e, None
    if wrote and _spool_waiting(config):  # once per transaction: the database works again
        try:
            spool_import(config)
        except Exception:
            pass  # the spool stays for the next request or `listener.py spool`
    return {"event_id": event_id, "duplicate": duplicate}, None, claim


###############################################################################
# Spool #######################################################################
###############################################################################


def spool_append(config, row):
    """Append one event to the spool file: one fsync'd line, written under an exclusive lock."""
    import base64
    import fcntl
    record = dict(row)
    record["raw_body"] = base64.b64encode(row.get("raw_body") or b"").decode("ascii")
    if record.get("spool_id") is None:
        record["spool_id"] = os.urandom(16).hex()
    line = (json_dumps(record, ensure_ascii=True) + "\n").encode("ascii")
    _private_folder(os.path.dirname(config.spool_file))
    fd = os.open(config.spool_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        written = os.write(fd, line)
        if written != len(line):
            raise OSError("short write to the spool")
        os.fsync(fd)
    finally:
        os.close(fd)


def _spool_waiting(config):
    try:
        return os.stat(config.spool_file).st_size > 0
    except OSError:
        return False


def spool_import(config, conn=None):
    """Move spooled events into the database exactly once: (imported, duplicates, unreadable lines)."""
    import base64
    import json
    import fcntl
    if not os.path.exists(config.spool_file):
        return 0, 0, 0
    conn = conn or connect(config)
    imported = duplicates = bad = 0
    fd = os.open(config.spool_file, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with os.fdopen(os.dup(fd), "rb") as f:
            lines = f.read().splitlines()
        rejected = []
        for line in lines:
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"))
                record["raw_body"] = base64.b64decode(record.get("raw_body") or "")
            except (ValueError, UnicodeDecodeError):
                bad += 1  # a torn write: never acknowledged, kept aside for a person to read
                rejected.append(line)
                continue
            # spool_id is UNIQUE: importing the same record again (after a crash) adds nothing.
            # Its handlers run later, from `listener.py deliver`.
            event_id, duplicate = store_event(conn, record, 0, [(h.name, "pending") for h in config.handlers])
            if duplicate:
                duplicates += 1
            else:
                imported += 1
        if rejected:
            bad_fd = os.open(config.spool_file + ".bad", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(bad_fd, b"".join(r + b"\n" for r in rejected))
                os.fsync(bad_fd)
            finally:
                os.close(bad_fd)
        os.ftruncate(fd, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    return imported, duplicates, bad


###############################################################################
# Logging #####################################################################
###############################################################################

LOG_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


def _printable(text):
    """One log-safe line: newlines and other control characters escaped."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def log(config, environ, level, request_id, message):
    """Write one line to log_file, or to the server's error log (wsgi.errors)."""
    if config is not None and LOG_LEVELS[level] < LOG_LEVELS[config.log_level]:
        return
    line = "%s %s [%s] %s\n" % (utc_now()[:19] + "Z", level.upper(), request_id, message)
    if config is not None and config.log_file:
        try:
            try:
                fd = os.open(config.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            except FileNotFoundError:  # its folder, made private on the first line
                _private_folder(os.path.dirname(config.log_file))
                fd = os.open(config.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode("utf-8", "replace"))
            finally:
                os.close(fd)
            return
        except OSError:
            pass  # fall back to the server's log rather than lose the line
    stream = environ.get("wsgi.errors") if environ else None
    try:
        (stream or sys.stderr).write(line)
        (stream or sys.stderr).flush()
    except Exception:
        pass


###############################################################################
# Handlers ####################################################################
###############################################################################

HANDLERS_DIR = os.path.join(HERE, "handlers")
DELIVERY_LEASE = 3600  # seconds after which a 'running' delivery whose process died may be claimed again


class Condition:
    """An only_if expression, parsed once: `path`, `not path`, `path == v`, `path != v`, `path in a, b`."""

    def __init__(self, text):
        self.text = text = text.strip()
        self.negate = False
        for op in (" not in ", " in ", "!=", "=="):
            left, found, right = text.partition(op)
            if found:
                self.path, self.op = left.strip(), op.strip()
                values = _split_list(right) if "in" in op else [right.strip()]
                self.values = [v[1:-1] if len(v) > 1 and v[0] == v[-1] and v[0] in "'\"" else v for v in values]
                break
        else:
            self.op, self.values = "truthy", []
            if text.startswith("not "):
                self.negate, text = True, text[4:].strip()
            self.path = text
        if not self.path or " " in self.path.split(".")[0]:
            raise ValueError("is not a condition (hint: contact.email, lead-status.label == Hot,"
                             " fields.Country in US, CA)")

    def __call__(self, event):
        value = event.get(self.path)
        text = "" if value is None or isinstance(value, (dict, list)) else str(value).strip()
        if self.op == "truthy":
            return bool(text or (isinstance(value, (dict, list)) and value)) != self.negate
        if self.op == "==":
            return text == self.values[0]
        if self.op == "!=":
            return text != self.values[0]
        return (text in self.values) == (self.op == "in")


class Settings(dict):
    """A handler's own [handler:NAME] keys as text, with helpers that read them and name the key in errors."""

    def __init__(self, values, name, config, timeout):
        super().__init__(values)
        self.name, self.section = name, "handler:" + name
        self.timeout = timeout  # this handler's time budget, in seconds
        self.config_file, self.folder, self.database = config.label, config.folder, config.database

    def error(self, key, problem, hint=None):
        """A ConfigError naming the file, section, key and value; raise it from check()."""
        return ConfigError("%s [%s] %s: %r %s%s" % (self.config_file, self.section, key, self.get(key, ""),
                                                    problem, " (hint: %s)" % hint if hint else ""))

    def path(self, key):
        """The key's path made absolute from the config file's folder; None when empty."""
        text = self.get(key, "").strip()
        return os.path.join(self.folder, os.path.expanduser(text)) if text else None

    def number(self, key, low, high, hint=None):
        try:
            value = float(self.get(key, "").strip())
        except ValueError:
            raise self.error(key, "is not a number", hint) from None
        if not low <= value <= high:
            raise self.error(key, "must be between %g and %g" % (low, high), hint)
        return int(value) if value == int(value) else value

    def flag(self, key):
        text = self.get(key, "").strip().lower()
        if text not in ("yes", "no", "true", "false", "on", "off", "1", "0"):
            raise self.error(key, "is not yes or no")
        return text in ("yes", "true", "on", "1")

    def choice(self, key, *choices):
        text = self.get(key, "").strip().lower()
        if text not in choices:
            raise self.error(key, "must be one of: %s" % ", ".join(choices))
        return text

    def lines(self, key):
        """The non-empty lines of a multi-line value (indented lines under `key =`)."""
        return [line.strip() for line in self.get(key, "").splitlines() if line.strip()]

    @staticmethod
    def expand(text):
        """${NAME} replaced by the environment variable NAME (LookupError when it is not set)."""
        return expand_environment(text)

    @staticmethod
    def encode_form(tree):
        """A tree as PHP's http_build_query writes it (listener.encode_form)."""
        return encode_form(tree)

    def pairs(self, key, separator="="):
        """[(name, value)] from lines such as `email = contact.email`."""
        out = []
        for line in self.lines(key):
            name, found, value = line.partition(separator)
            if not found or not name.strip():
                raise self.error(key, "has a line that is not `name %s value`: %r" % (separator, line))
            out.append((name.strip(), value.strip()))
        return out


def expand_environment(text):
    """${NAME} replaced by the environment variable NAME; a missing one is an error at delivery time."""
    out, rest = [], text
    while "${" in rest:
        before, _, after = rest.partition("${")
        name, found, rest = after.partition("}")
        if not found:
            return "".join(out) + before + "${" + after
        if name not in os.environ:
            raise LookupError("the environment variable %s is not set" % name)
        out += [before, os.environ[name]]
    return "".join(out) + rest


_modules = {}  # handler module path -> (mtime, module)


def _handler_module(name, where):
    """Import handlers/NAME.py by path (mod_wsgi puts neither our folder nor the cwd on sys.path)."""
    path = os.path.join(HANDLERS_DIR, name + ".py")
    try:
        mtime = os.stat(path).st_mtime_ns
    except OSError:
        available = sorted(f[:-3] for f in os.listdir(HANDLERS_DIR) if f.endswith(".py") and f != "__init__.py") \
            if os.path.isdir(HANDLERS_DIR) else []
        raise ConfigError("%s: %r is not a module in handlers/ (hint: the handlers are: %s)" % (
            where, name, ", ".join(available) or "none")) from None
    cached = _modules.get(path)
    if cached and cached[0] == mtime:
        return cached[1]
    import importlib.util
    spec = importlib.util.spec_from_file_location("vbout_listener_handlers." + name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise ConfigError("%s: handlers/%s.py cannot be loaded: %s: %s (hint: run `python3 listener.py"
                          " check`)" % (where, name, type(e).__name__, _printable(e))) from None
    if not callable(getattr(module, "handle", None)):
        raise ConfigError("%s: handlers/%s.py has no handle(event, settings) function (hint: a handler"
                          " defines `def handle(event, settings):`)" % (where, name))
    _modules[path] = (mtime, module)
    return module


class Handler:
    """One enabled handler: its [handler:NAME] section read, its module loaded and checked."""

    def __init__(self, config, name, given):
        label = config.label
        common = _check_section(label, "handler:" + name, "handler:*",
                                {k: given.pop(k) for k in list(given) if ("handler:*", k) in KEYS})
        get = lambda key: common[("handler:" + name, key)]  # noqa: E731
        self.name = name
        self.module_name = get("module") or name
        where = "%s [handler:%s] module" % (label, name) if get("module") else "%s [handlers] enabled" % label
        if not _is_name(self.module_name):
            raise ConfigError("%s: %r is not a module name (hint: the file name in handlers/ without .py,"
                              " no dots or slashes)" % (where, self.module_name))
        self.module = _handler_module(self.module_name, where)
        self.run = get("run") or config.handler_defaults["run"]
        self.timeout = get("timeout") or config.handler_defaults["timeout"]
        self.condition = get("only_if")
        declared = getattr(self.module, "SETTINGS", None)
        if declared is not None:
            for key in given:
                if key not in declared:
                    raise ConfigError("%s [handler:%s] %s: unknown key (hint: %s)" % (
                        label, name, key, _known_keys_hint(key, list(declared) + [n for (s, n) in KEYS
                                                                                 if s == "handler:*"])))
            given = dict({k: v[0] for k, v in declared.items()}, **given)
        self.settings = Settings(given, name, config, self.timeout)
        check = getattr(self.module, "check", None)
        parsed = None
        if check is not None:
            try:
                parsed = check(self.settings)
            except ConfigError:
                raise
            except Exception as e:
                raise ConfigError("%s [handler:%s]: %s" % (label, name, _printable(e))) from None
        self.options = self.settings if parsed is None else parsed


class Event:
    """A stored event as handlers see it: the raw tree and forgiving views over Vbout's sections."""

    SECTIONS = {"campaigns_opened": "campaigns-opened", "links_clicked": "links-clicked",
                "pages_visited": "pages-visited", "automations_triggered": "automation-triggered",
                "goals_reached": "goals-reached", "webhooks_triggered": "webhooks-triggered",
                "lead_scores": "lead-score"}

    def __init__(self, id, transaction_id, received_at, method, data, content_type=None, payload=None):
        self.id, self.transaction_id, self.received_at = id, transaction_id, received_at
        self.method, self.data, self.content_type = method, data, content_type
        self._payload = payload  # data as the JSON text stored in events.payload, when known

    @classmethod
    def from_row(cls, row):
        return cls(row["id"], row["transaction_id"], row["received_at"], row["method"],
                   json_loads(row["payload"]), row["content_type"], row["payload"])

    def __getattr__(self, name):
        section = self.SECTIONS.get(name)
        if section is None:
            raise AttributeError(name)
        return _items(self.data.get(section))

    @property
    def query(self):
        """The query parameters of a GET event (Vbout's shortcode mode); {} for a POST."""
        return self.data if self.method == "GET" else {}

    @property
    def contact(self):
        """id, email, phone and profile_url (None when absent), and any other key Vbout sent."""
        given = self.data.get("contact")
        if not isinstance(given, dict):
            given = {k: self.data[k] for k in ("id", "email", "phone") if k in self.data} \
                if self.method == "GET" else {}
        return dict({"id": None, "email": None, "phone": None, "profile_url": None}, **given)

    @property
    def fields(self):
        return Fields(_items(self.data.get("fields")))

    @property
    def lead_status(self):
        """{'score': ..., 'label': ...} of the latest lead status, or {}."""
        given = self.data.get("lead-status")
        if isinstance(given, dict) and not all(isinstance(v, dict) for v in given.values()):
            return dict(given)
        items = _items(given)
        return dict(items[-1]) if items else {}

    def get(self, path, default=None):
        """A value by dotted path: contact.email, fields.First Name, lead-status.label, links-clicked.0.url."""
        head, _, rest = path.partition(".")
        if head == "event":
            return getattr(self, rest, default) if rest in ("id", "transaction_id", "received_at", "method") \
                else default
        if head == "fields":
            value = self.fields.get(rest) if rest else self.fields.items
            return default if value is None else value
        value = {"contact": self.contact, "lead-status": self.lead_status, "lead_status": self.lead_status,
                 "query": self.query}.get(head, None)
        parts = rest.split(".") if rest else []
        if value is None:
            value, parts = self.data, path.split(".")
        for part in parts:
            if isinstance(value, dict):
                value = value.get(part)
            elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
                value = value[int(part)]
            else:
                return default
        return default if value is None else value

    def as_dict(self):
        return {"id": self.id, "transaction_id": self.transaction_id, "received_at": self.received_at,
                "method": self.method, "data": self.data}

    def as_json(self):
        """as_dict() as compact JSON text, reusing the payload as stored rather than encoding it again."""
        return _event_json(self.id, self.transaction_id, self.received_at, self.method,
                          self._payload if self._payload is not None else json_dumps(self.data))


def _event_json(event_id, transaction_id, received_at, method, payload):
    """An event as one compact JSON object, its payload (JSON text, as stored) put in unparsed."""
    head = json_dumps({"id": event_id, "transaction_id": transaction_id, "received_at": received_at,
                       "method": method})
    return '%s,"data":%s}' % (head[:-1], payload)


def _items(value):
    """A section as a list of dicts, whether Vbout sent it as a list, keyed by id, one item, or not at all."""
    if isinstance(value, list):
        return [item for item in value if isinstance(item, dict)]
    if isinstance(value, dict):
        if value and all(isinstance(v, dict) for v in value.values()):
            return [v if "id" in v else dict(v, id=k) for k, v in value.items()]
        return [value] if value else []
    return []


class Fields:
    """Custom fields, by name (`fields["First Name"]`) or by id (`fields["17"]`), and as a list."""

    def __init__(self, items):
        self.items = items
        self.by_id = {str(f.get("id")): f.get("value") for f in items if f.get("id") is not None}
        self.by_name = {str(f.get("name")): f.get("value") for f in items if f.get("name") is not None}

    def get(self, key, default=None):
        if key in self.by_name:
            return self.by_name[key]
        return self.by_id.get(key, default)

    def __getitem__(self, key):
        value = self.get(key, self)
        if value is self:
            raise KeyError(key)
        return value

    def __contains__(self, key):
        return key in self.by_name or key in self.by_id

    def __iter__(self):
        return iter(self.items)

    def __len__(self):
        return len(self.items)


class _Workers:
    """Threads that run handlers, so that one that hangs costs its own delivery, not the request."""

    def __init__(self):
        self.idle, self.lock = [], None

    def call(self, fn, args, timeout):
        """(finished, ok, value or exception, traceback text) of fn(*args) within timeout seconds."""
        import threading
        from queue import SimpleQueue
        if self.lock is None:
            self.lock = threading.Lock()
        with self.lock:
            worker = self.idle.pop() if self.idle else None
        if worker is None:
            worker = {"jobs": SimpleQueue()}
            threading.Thread(target=self._loop, args=(worker,), name="vbout-handler", daemon=True).start()
        done = threading.Event()
        job = {"fn": fn, "args": args, "done": done, "abandoned": False}
        worker["jobs"].put(job)
        if not done.wait(timeout):
            with self.lock:
                job["abandoned"] = True
            return False, False, None, None
        return True, job["ok"], job["value"], job.get("trace")

    def _loop(self, worker):
        while True:
            job = worker["jobs"].get()
            try:
                job["value"], job["ok"] = job["fn"](*job["args"]), True
            except BaseException as e:
                import traceback
                job["value"], job["ok"], job["trace"] = e, False, traceback.format_exc()
            job["done"].set()
            with self.lock:
                if job["abandoned"]:
                    return  # its caller gave up on it; a fresh thread takes its place
                self.idle.append(worker)


_workers = _Workers()


def _one_line(text, limit=300):
    return _printable(" ".join(str(text).split()))[:limit]


def run_handler(handler, event, log_error):
    """Run one handler for one event: (status, last_error, duration_ms, result)."""
    started = time.perf_counter()
    if handler.condition is not None:
        try:
            if not handler.condition(event):
                return "skipped", None, 0.0, None
        except Exception as e:
            return "failed", "only_if could not be evaluated: %s" % _one_line(e), 0.0, None
    if getattr(handler.module, "LOCAL", False):
        # It only touches local files, bounded by their own timeouts: the request's thread runs it,
        # which saves two thread switches per event.
        try:
            finished, ok, value, trace = True, True, handler.module.handle(event, handler.options), None
        except Exception as e:
            import traceback
            finished, ok, value, trace = True, False, e, traceback.format_exc()
    else:
        finished, ok, value, trace = _workers.call(handler.module.handle, (event, handler.options),
                                                   handler.timeout)
    duration = (time.perf_counter() - started) * 1000
    if not finished:
        return "failed", "timed out after %g s" % handler.timeout, duration, None
    if not ok:
        for line in (trace or "").rstrip().splitlines():
            log_error("handler %s, event %s: %s" % (handler.name, event.id, _printable(line)))
        message = str(value) or type(value).__name__
        return "failed", _one_line("%s: %s" % (type(value).__name__, message)), duration, None
    result = None
    if isinstance(value, dict):
        result = {str(k)[:64]: (v[:200] if isinstance(v, str) else v) for k, v in list(value.items())[:20]
                  if v is None or isinstance(v, (str, int, float, bool))}
    return "done", None, duration, result


def _record(conn, config, claim, outcomes, wait_for_disk=True):
    """Write deliveries' outcomes in one transaction, except those another run has claimed since.

    wait_for_disk=False commits without an fsync (an inline run: it saves the CPU of one). A power
    cut may then lose the outcome, never the event: the delivery stays 'running' and `deliver`
    runs it again once its lease has passed. The next durable commit flushes it anyway.
    """
    now = time.time()
    stamp, rows = utc_now(now), []
    if not wait_for_disk:
        conn.execute("PRAGMA synchronous=NORMAL")
    try:
        _write_outcomes(conn, config, claim, outcomes, now, stamp, rows)
    finally:
        if not wait_for_disk:
            conn.execute("PRAGMA synchronous=%s" % ("FULL" if config.durability == "full" else "NORMAL"))


def _write_outcomes(conn, config, claim, outcomes, now, stamp, rows):
    with transaction(conn):
        for (event_id, handler_name), (status, error, duration, result) in outcomes:
            next_at = None
            if status == "failed":
                attempts = conn.execute("SELECT attempts FROM deliveries WHERE event_id = ? AND handler = ?",
                                        (event_id, handler_name)).fetchone()[0] + 1
                next_at = utc_now(now + min(config.handler_defaults["retry_delay"] * 2 ** (attempts - 1), 86400))
            rows.append((status, 0 if status == "skipped" else 1, error, round(duration, 2), stamp, next_at,
                         json_dumps(result) if result else None, event_id, handler_name, claim))
        conn.executemany("UPDATE deliveries SET status = ?, attempts = attempts + ?, last_error = ?,"
                         " duration_ms = ?, updated_at = ?, next_attempt_at = ?, result = ?, claimed_by = NULL"
                         " WHERE event_id = ? AND handler = ? AND claimed_by = ?", rows)


def claim_deliveries(conn, config, kind, event_id=None, handler_name=None, limit=100):
    """Claim deliveries in one transaction, so that two cron runs never run the same one.

    kind: 'pending' (deliver), 'failed' (retry, those due and under max_attempts), or
    'replay' (event_id's deliveries, whatever their status). Returns [(event_id, handler)].
    """
    names = [h.name for h in config.handlers]
    if handler_name is not None:
        names = [n for n in names if n == handler_name]
    if not names:
        return [], None
    claim, now = os.urandom(8).hex(), utc_now()
    marks = ", ".join("?" * len(names))
    with transaction(conn):
        if kind == "replay":
            for name in names:
                if not conn.execute("SELECT 1 FROM deliveries WHERE event_id = ? AND handler = ?",
                                    (event_id, name)).fetchone():
                    conn.execute("INSERT INTO deliveries (event_id, handler, status, attempts, updated_at)"
                                 " VALUES (?, ?, 'pending', 0, ?)", (event_id, name, now))
            rows = conn.execute("SELECT event_id, handler FROM deliveries WHERE event_id = ? AND handler IN (%s)"
                                % marks, [event_id] + names).fetchall()
        elif kind == "pending":
            stale = utc_now(time.time() - DELIVERY_LEASE)
            rows = conn.execute("SELECT event_id, handler FROM deliveries WHERE handler IN (%s) AND"
                                " (status = 'pending' OR (status = 'running' AND updated_at < ?))"
                                " ORDER BY event_id LIMIT ?" % marks, names + [stale, limit]).fetchall()
        else:
            rows = conn.execute("SELECT event_id, handler FROM deliveries WHERE handler IN (%s) AND"
                                " status = 'failed' AND attempts < ? AND (next_attempt_at IS NULL OR"
                                " next_attempt_at <= ?) ORDER BY event_id LIMIT ?" % marks,
                                names + [config.handler_defaults["max_attempts"], now, limit]).fetchall()
        for row in rows:
            conn.execute("UPDATE deliveries SET status = 'running', claimed_by = ?, updated_at = ?"
                         " WHERE event_id = ? AND handler = ?", (claim, now, row[0], row[1]))
    return [tuple(r) for r in rows], claim


def run_claimed(conn, config, claimed, claim, log_error, events=None, together=False):
    """Run claimed deliveries and record each outcome: {(event_id, handler): outcome}.

    together: record every outcome in one transaction at the end (an inline run); otherwise
    each is recorded as soon as it is known (cron runs, which may be long).
    """
    import sqlite3
    outcomes = {}
    for event_id, handler_name in claimed:
        event = (events or {}).get(event_id)
        if event is None:
            conn.row_factory = sqlite3.Row
            try:
                row = conn.execute("SELECT * FROM events WHERE id = ?", (event_id,)).fetchone()
            finally:
                conn.row_factory = None
            event = Event.from_row(row)
        outcome = outcomes[(event_id, handler_name)] = run_handler(config.handler(handler_name), event, log_error)
        if not together:
            _record(conn, config, claim, [((event_id, handler_name), outcome)])
    if together:
        _record(conn, config, claim, outcomes.items(), wait_for_disk=False)
    return outcomes


def failing_deliveries(conn, limit=20):
    """The deliveries still failing, newest first: [(event_id, handler, attempts, last_error)]."""
    return conn.execute("SELECT event_id, handler, attempts, last_error FROM deliveries WHERE status = 'failed'"
                        " ORDER BY updated_at DESC LIMIT ?", (limit,)).fetchall()


###############################################################################
# Operator's tools ############################################################
###############################################################################
# The questions an operator asks: the command line and the status page both call these.

SECTIONS = ("campaigns-opened", "links-clicked", "pages-visited", "automation-triggered", "goals-reached",
            "webhooks-triggered", "lead-score")


def parse_when(text, now=None):
    """'7d', '24h', '30m', '2026-11-01' or '2026-11-01T10:00' as UTC text comparable with received_at."""
    text = (text or "").strip()
    units = {"m": 60, "h": 3600, "d": 86400, "w": 604800}
    if text[:-1].isdigit() and text[-1:] in units:
        return utc_now((now or time.time()) - int(text[:-1]) * units[text[-1]])
    if len(text) >= 10 and text[:4].isdigit() and text[4] == "-" and text[7] == "-":
        return text.replace(" ", "T").rstrip("Z")
    raise ValueError("%r is not a time: use 7d, 24h, 30m or 2026-11-01" % text)


def find_events(conn, since=None, until=None, email=None, transaction=None, status=None, search=None,
                limit=50, after_id=None):
    """Events newest first (oldest first with after_id), each with {handler: status} of its deliveries."""
    where, params = [], []
    for clause, value in (("received_at >= ?", since), ("received_at < ?", until), ("transaction_id = ?", transaction),
                          ("lower(contact_email) = lower(?)", email), ("id > ?", after_id)):
        if value is not None:
            where.append(clause)
            params.append(value)
    if status:
        where.append("id IN (SELECT event_id FROM deliveries WHERE status = ?)")
        params.append(status)
    if search:
        where.append("(lower(contact_email) = lower(?) OR transaction_id = ? OR CAST(id AS TEXT) = ?)")
        params += [search.strip()] * 3
    sql = "SELECT id, received_at, method, transaction_id, contact_email, repeats FROM events%s ORDER BY id %s LIMIT ?" % (
        " WHERE " + " AND ".join(where) if where else "", "ASC" if after_id is not None else "DESC")
    rows = [dict(zip(("id", "received_at", "method", "transaction_id", "contact_email", "repeats"), r))
            for r in conn.execute(sql, params + [limit])]
    if rows:
        ids = [r["id"] for r in rows]
        found = {}
        for event_id, handler, state in conn.execute(
                "SELECT event_id, handler, status FROM deliveries WHERE event_id IN (%s) ORDER BY handler"
                % ",".join("?" * len(ids)), ids):
            found.setdefault(event_id, {})[handler] = state
        for r in rows:
            r["deliveries"] = found.get(r["id"], {})
    return rows


def event_detail(conn, event_id):
    """One event with its tree and deliveries, or None."""
    row = conn.execute("SELECT id, received_at, method, content_type, remote_addr, transaction_id, contact_email,"
                       " contact_id, repeats, payload, length(raw_body) FROM events WHERE id = ?", (event_id,)).fetchone()
    if row is None:
        return None
    names = ("id", "received_at", "method", "content_type", "remote_addr", "transaction_id", "contact_email",
             "contact_id", "repeats", "data", "raw_bytes")
    event = dict(zip(names, row))
    event["data"] = json_loads(event["data"])
    event["deliveries"] = [dict(zip(("handler", "status", "attempts", "last_error", "duration_ms", "updated_at"), d))
                           for d in conn.execute("SELECT handler, status, attempts, last_error, duration_ms, updated_at"
                                                 " FROM deliveries WHERE event_id = ? ORDER BY handler", (event_id,))]
    return event


def stats(conn, days=14):
    """Events per day, repeats, spooled, deliveries by handler and status, the last event."""
    since = utc_now(time.time() - days * 86400)[:10]
    per_day = [dict(zip(("day", "events", "repeats", "spooled"), r)) for r in conn.execute(
        "SELECT substr(received_at, 1, 10) AS day, count(*), sum(repeats), count(spool_id) FROM events"
        " WHERE received_at >= ? GROUP BY day ORDER BY day DESC", (since,))]
    last = conn.execute("SELECT id, received_at FROM events ORDER BY id DESC LIMIT 1").fetchone()
    return {"events": conn.execute("SELECT count(*) FROM events").fetchone()[0],
            "last_event": {"id": last[0], "received_at": last[1]} if last else None,
            "per_day": per_day,
            "deliveries": [dict(zip(("handler", "status", "count"), r)) for r in conn.execute(
                "SELECT handler, status, count(*) FROM deliveries GROUP BY handler, status ORDER BY handler, status")]}


def export_events(conn, fmt, since=None, until=None, email=None):
    """Lines of a CSV (flattened: contact, lead status, counts, custom fields by name) or JSONL export."""
    where = " AND ".join(c for c, v in (("received_at >= :since", since), ("received_at < :until", until),
                                         ("lower(contact_email) = lower(:email)", email)) if v is not None)
    sql = "SELECT id, received_at, method, transaction_id, payload FROM events%s ORDER BY id" % (
        " WHERE " + where if where else "")
    params = {"since": since, "until": until, "email": email}
    if fmt == "jsonl":
        for event_id, received_at, method, transaction_id, payload in conn.execute(sql, params):
            yield _event_json(event_id, transaction_id, received_at, method, payload) + "\n"
        return
    import csv
    import io
    fields = []
    for (payload,) in conn.execute(sql.replace("id, received_at, method, transaction_id, payload", "payload"), params):
        for name in Fields(_items(json_loads(payload).get("fields"))).by_name:
            if name not in fields:
                fields.append(name)
    columns = ["id", "received_at", "method", "transaction_id", "contact_id", "contact_email", "contact_phone",
               "contact_profile_url", "lead_score", "lead_label"] + [s.replace("-", "_") for s in SECTIONS] + fields
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(columns)
    for event_id, received_at, method, transaction_id, payload in conn.execute(sql, params):
        event = Event(event_id, transaction_id, received_at, method, json_loads(payload))
        contact, status, by_name = event.contact, event.lead_status, event.fields.by_name
        writer.writerow([event_id, received_at, method, transaction_id] +
                        [_csv_cell(contact[k]) for k in ("id", "email", "phone", "profile_url")] +
                        [_csv_cell(status.get("score")), _csv_cell(status.get("label"))] +
                        [len(_items(event.data.get(s))) for s in SECTIONS] + [_csv_cell(by_name.get(f)) for f in fields])
        yield out.getvalue()
        out.seek(0)
        out.truncate()
    if out.getvalue():
        yield out.getvalue()


def _csv_cell(value):
    """A CSV cell a spreadsheet will not run as a formula."""
    text = "" if value is None or isinstance(value, (dict, list)) else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def prune(config, older_than, contacts=False, progress=None):
    """Delete events received before older_than, with their deliveries; then VACUUM. Returns counts."""
    conn = connect(config)
    removed = {"events": 0, "deliveries": 0}
    total = conn.execute("SELECT count(*) FROM events WHERE received_at < ?", (older_than,)).fetchone()[0]
    while True:
        with transaction(conn):
            ids = [r[0] for r in conn.execute("SELECT id FROM events WHERE received_at < ? LIMIT 500", (older_than,))]
            if not ids:
                break
            marks = ",".join("?" * len(ids))
            removed["deliveries"] += conn.execute("DELETE FROM deliveries WHERE event_id IN (%s)" % marks, ids).rowcount
            removed["events"] += conn.execute("DELETE FROM events WHERE id IN (%s)" % marks, ids).rowcount
        if progress:
            progress(removed["events"], total)
    if contacts:
        for handler in config.handlers:
            hook = getattr(handler.module, "prune", None)
            if hook is not None:
                for what, count in (hook(older_than, handler.options) or {}).items():
                    removed["%s: %s" % (handler.name, what)] = count
    compact(conn)
    return removed


def compact(conn):
    """Fold the WAL into the database and rewrite it, so that deleted rows leave no bytes behind."""
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("VACUUM")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def forget(config, email, progress=None):
    """Erase a person everywhere the listener keeps them. Returns [what was removed, as text]."""
    email = email.strip()
    needles = sorted({email.lower(), email.lower().replace("@", "%40")})
    report = []
    conn = connect(config)
    conn.execute("PRAGMA secure_delete=ON")  # freed pages are zeroed, not left readable
    try:
        with transaction(conn):
            clauses = " OR ".join(["lower(contact_email) = ?"] + ["instr(lower(payload), ?) > 0",
                                                                  "instr(lower(CAST(raw_body AS TEXT)), ?) > 0"] * len(needles))
            params = [email.lower()] + [n for n in needles for _ in (0, 1)]
            ids = [r[0] for r in conn.execute("SELECT id FROM events WHERE " + clauses, params)]
            marks = ",".join("?" * len(ids))
            deliveries = conn.execute("DELETE FROM deliveries WHERE event_id IN (%s)" % marks, ids).rowcount if ids else 0
            if ids:
                conn.execute("DELETE FROM events WHERE id IN (%s)" % marks, ids)
        report.append("events: %d removed%s" % (len(ids), " (ids %s)" % ", ".join(map(str, ids[:20])) if ids else ""))
        report.append("deliveries: %d removed" % deliveries)
        for position, handler in enumerate(config.handlers):
            hook = getattr(handler.module, "forget", None)
            if hook is not None:
                report += ["%s: %s" % (handler.name, line) for line in hook(email, handler.options) or []]
            if progress:
                progress(position + 1, len(config.handlers))
        report.append("spool: %d records removed" % _spool_forget(config, needles))
        compact(conn)
    finally:
        conn.execute("PRAGMA secure_delete=OFF")
    return report


def _spool_forget(config, needles):
    import fcntl
    if not os.path.exists(config.spool_file):
        return 0
    fd = os.open(config.spool_file, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with os.fdopen(os.dup(fd), "rb") as f:
            lines = f.read().splitlines(True)
        kept = [line for line in lines if not any(n.encode() in line.lower() for n in needles)]
        if len(kept) != len(lines):
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, 0)
            os.write(fd, b"".join(kept))
            os.fsync(fd)
        return len(lines) - len(kept)
    finally:
        os.close(fd)


def sample_tree(n=1):
    """A realistic Vbout call: a contact, custom fields, a few activities, a lead status."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    return {
        "transactionid": "sample-%d-%s" % (n, os.urandom(4).hex()),
        "contact": {"id": str(5000 + n), "email": "sample%d@example.com" % n, "phone": "+1 555 0100",
                    "profile_url": "https://app.vbout.com/Contact/%d" % (5000 + n)},
        "fields": [{"id": "1", "name": "First Name", "value": "Ana"}, {"id": "2", "name": "Last Name", "value": "Sample"},
                   {"id": "3", "name": "Country", "value": "US"}],
        "campaigns-opened": [{"id": "700", "name": "Welcome", "open_date": stamp}],
        "links-clicked": [{"url": "https://example.com/offer?utm_source=vbout", "clicks": "2"}],
        "pages-visited": [{"page": "https://example.com/pricing", "visit_date": stamp}],
        "automation-triggered": [{"id": "40", "name": "Welcome journey", "trigger_date": stamp}],
        "goals-reached": [{"id": "9", "name": "Signed up", "reach_date": stamp}],
        "webhooks-triggered": [], "lead-score": [{"id": "1", "name": "Engagement", "score": "10", "score_date": stamp}],
        "lead-status": {"score": "42", "label": "Hot"},
    }


def encode_form(value, prefix=None):
    """A tree as PHP's http_build_query writes it: the inverse of parse_form."""
    from urllib.parse import quote_plus
    pairs = []

    def walk(node, name):
        if isinstance(node, dict) or isinstance(node, list):
            for key, item in (node.items() if isinstance(node, dict) else enumerate(node)):
                walk(item, "%s[%s]" % (name, key) if name is not None else str(key))
        elif name is not None:
            text = "" if node is None else "1" if node is True else "0" if node is False else str(node)
            pairs.append(quote_plus(name) + "=" + quote_plus(text))
    walk(value, prefix)
    return "&".join(pairs).encode("ascii")


def learn(conn, limit=1000):
    """What the latest events looked like: sections, custom fields, content types, GET parameters."""
    seen = {"events": 0, "content_types": {}, "sections": {}, "fields": {}, "get_parameters": {}}
    for method, content_type, payload in conn.execute(
            "SELECT method, content_type, payload FROM events ORDER BY id DESC LIMIT ?", (limit,)):
        seen["events"] += 1
        kind = method if method == "GET" else (content_type or "none").split(";")[0]
        seen["content_types"][kind] = seen["content_types"].get(kind, 0) + 1
        tree = json_loads(payload)
        counts = seen["get_parameters"] if method == "GET" else seen["sections"]
        for key in tree:
            counts[key] = counts.get(key, 0) + 1
        for name in Fields(_items(tree.get("fields"))).by_name:
            seen["fields"][name] = seen["fields"].get(name, 0) + 1
    return seen


def field_map(seen):
    """Lines to paste as a forward handler's `map` or a csv handler's `columns`."""
    lines = ["email = contact.email", "vbout_id = contact.id"] if seen["sections"] else []
    lines += ["%s = fields.%s" % (_snake(name), name) for name in sorted(seen["fields"], key=seen["fields"].get,
                                                                          reverse=True)]
    if "lead-status" in seen["sections"]:
        lines += ["lead_status = lead-status.label", "lead_score = lead-status.score"]
    lines += ["%s = %s" % (_snake(name), name) for name in seen["get_parameters"] if name not in ("key",)]
    return lines


def _snake(name):
    out = "".join(c.lower() if c.isalnum() else "_" for c in name).strip("_")
    return "_".join(part for part in out.split("_") if part) or "value"


###############################################################################
# Status page #################################################################
###############################################################################
# listener.py?view=status, for hosts without a shell. Off unless [listener] admin_secret is set.
# Plain HTML forms, no script: a strict Content-Security-Policy allows only its own stylesheet.

ADMIN_COOKIE = "vbout_admin"
SESSION_SECONDS = 8 * 3600
SIGNIN_FAILURES, SIGNIN_WINDOW = 5, 900  # per client address: then 429 until the window has passed
STYLE = ("body{font:15px/1.45 system-ui,sans-serif;margin:0 auto;max-width:960px;padding:0 12px;color:#222}"
         "header{display:flex;flex-wrap:wrap;gap:12px;align-items:center;border-bottom:1px solid #ccc}"
         "h1{font-size:1.2em;margin:.6em 0}nav a,nav button{margin-right:10px}table{border-collapse:collapse;"
         "width:100%;margin:.5em 0 1.5em}td,th{border-bottom:1px solid #eee;padding:4px 6px;text-align:left;"
         "vertical-align:top;word-break:break-word}pre{background:#f6f6f6;padding:8px;overflow-x:auto;"
         "white-space:pre-wrap}.failed{color:#b00}.done{color:#070}.msg{background:#ffd;padding:6px}"
         "form.inline{display:inline}input{font:inherit;padding:4px}button{font:inherit;padding:3px 10px}")


class _Page(Exception):
    """An admin page to answer with: status, HTML body, extra headers."""

    def __init__(self, status, body, headers=()):
        super().__init__(status)
        self.status, self.body, self.headers = status, body, list(headers)


def _admin_key(config):
    import hashlib
    return hashlib.sha256(b"vbout-listener-admin\0" + config.admin_secret).digest()


def _sign(config, text):
    import hmac
    return hmac.new(_admin_key(config), text.encode(), "sha256").hexdigest()


def _session(environ, config):
    """The session nonce of a valid, unexpired admin cookie, or None."""
    for part in environ.get("HTTP_COOKIE", "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == ADMIN_COOKIE and value.count(".") == 2:
            expiry, nonce, signature = value.split(".")
            if expiry.isdigit() and int(expiry) > time.time() and _compare_digest(
                    signature.encode(), _sign(config, expiry + "." + nonce).encode()):
                return nonce
    return None


def _cookie(environ, value, max_age):
    path = environ.get("SCRIPT_NAME") or "/"
    secure = environ.get("wsgi.url_scheme") == "https" or environ.get("HTTPS", "").lower() in ("on", "1")
    return ("Set-Cookie", "%s=%s; Path=%s; Max-Age=%d; HttpOnly; SameSite=Strict%s" % (
        ADMIN_COOKIE, value, path, max_age, "; Secure" if secure else ""))


def admin(environ, config, method, remote):
    """Answer a ?view= request: (status, headers, HTML bytes)."""
    try:
        if not config.admin_secret:
            raise _Page(404, _html("Status page off", "<p>The status page is off. To turn it on, set"
                                   " <code>[listener] admin_secret</code> in config.ini.</p>"))
        if method not in ("GET", "HEAD", "POST"):
            raise _Page(405, _html("Not allowed", "<p>Use GET or POST.</p>"), [("Allow", "GET, HEAD, POST")])
        params = parse_query(environ.get("QUERY_STRING", ""), 50, 4)
        session = _session(environ, config)
        if method == "POST":
            _admin_post(environ, config, session, remote)
        if session is None:
            raise _Page(200, _signin_page())
        conn = connect(config)
        if params.get("view") == "export":
            body = "".join(export_events(conn, "csv")).encode("utf-8")
            raise _Page(200, body, [("Content-Type", "text/csv; charset=utf-8"),
                                    ("Content-Disposition", 'attachment; filename="vbout-events.csv"')])
        event_id = params.get("event")
        if isinstance(event_id, str) and event_id.isdigit():
            raise _Page(200, _event_page(conn, config, int(event_id), session))
        query = params.get("q") if isinstance(params.get("q"), str) else ""
        raise _Page(200, _dashboard(environ, conn, config, session, query.strip()))
    except _Page as page:
        return page.status, page.headers, page.body


def _admin_post(environ, config, session, remote):
    """Sign in, sign out, or retry a delivery; every answer is a page or a redirect (_Page)."""
    try:
        form = parse_form(_read_body(environ, config)[:65536], 20, 2)
    except HTTPError:
        raise _Page(400, _html("Bad request", "<p>That form could not be read.</p>")) from None
    action = form.get("action")
    target = [("Location", "?view=status")]
    if action == "signin":
        _signin(environ, config, remote, str(form.get("admin_key", "")))
    if session is None or not _compare_digest(str(form.get("csrf", "")).encode(), _csrf(config, session).encode()):
        raise _Page(403, _html("Forbidden", "<p>Your session has ended. <a href=\"?view=status\">Sign in</a>"
                                            " again.</p>"))
    if action == "signout":
        raise _Page(303, b"", target + [_cookie(environ, "", 0)])
    if action == "retry" and str(form.get("event_id", "")).isdigit():
        conn = connect(config)
        event_id = int(form["event_id"])
        claimed, claim = claim_deliveries(conn, config, "replay", event_id, str(form.get("handler", "")))
        if claimed:
            run_claimed(conn, config, claimed, claim, lambda line: log(config, environ, "error", "admin", line))
        raise _Page(303, b"", [("Location", "?view=status&event=%d" % event_id)])
    raise _Page(400, _html("Bad request", "<p>Unknown action.</p>"))


def _signin(environ, config, remote, given):
    """Check the admin key, at most SIGNIN_FAILURES wrong ones per address per SIGNIN_WINDOW seconds."""
    conn = connect(config)
    now = time.time()
    with transaction(conn):
        row = conn.execute("SELECT failures, since FROM admin_attempts WHERE address = ?", (remote,)).fetchone()
        if row and row[1] < utc_now(now - SIGNIN_WINDOW):
            row = None
        if row and row[0] >= SIGNIN_FAILURES:
            raise _Page(429, _html("Too many attempts", "<p>Too many sign-in attempts from your address."
                                                        " Try again in 15 minutes.</p>"), [("Retry-After", "900")])
        if _compare_digest(given.encode("utf-8", "replace"), config.admin_secret):
            conn.execute("DELETE FROM admin_attempts WHERE address = ?", (remote,))
            expiry, nonce = str(int(now + SESSION_SECONDS)), os.urandom(16).hex()
            token = "%s.%s.%s" % (expiry, nonce, _sign(config, expiry + "." + nonce))
            raise _Page(303, b"", [("Location", "?view=status"), _cookie(environ, token, SESSION_SECONDS)])
        conn.execute("INSERT OR REPLACE INTO admin_attempts (address, failures, since) VALUES (?, ?, ?)",
                     (remote, (row[0] if row else 0) + 1, row[1] if row else utc_now(now)))
    raise _Page(403, _signin_page("That admin key is wrong."))


def _csrf(config, session):
    return _sign(config, "csrf." + session)[:32]


def _e(value):
    import html
    return html.escape("" if value is None else str(value), quote=True)


def _html(title, content, nav=""):
    return ('<!doctype html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width='
            'device-width, initial-scale=1"><title>%s · Vbout listener</title><style>%s</style></head><body><header>'
            '<h1>Vbout listener</h1>%s</header><main>%s</main></body></html>' % (_e(title), STYLE, nav, content)
            ).encode("utf-8")


def _signin_page(message=None):
    return _html("Sign in", '%s<form method="post" action="?view=status"><p><label>Admin key<br><input type="password"'
                            ' name="admin_key" autocomplete="current-password" required autofocus></label></p>'
                            '<input type="hidden" name="action" value="signin"><button>Sign in</button></form>'
                 % ('<p class="msg">%s</p>' % _e(message) if message else ""))


def _nav(config, session):
    return ('<nav><a href="?view=status">Status</a><a href="?view=export">Export CSV</a><form class="inline"'
            ' method="post" action="?view=status"><input type="hidden" name="action" value="signout"><input'
            ' type="hidden" name="csrf" value="%s"><button>Sign out</button></form></nav>' % _csrf(config, session))


def _retry_button(config, session, event_id, handler):
    return ('<form class="inline" method="post" action="?view=status"><input type="hidden" name="action" value="retry">'
            '<input type="hidden" name="csrf" value="%s"><input type="hidden" name="event_id" value="%d"><input'
            ' type="hidden" name="handler" value="%s"><button>Retry</button></form>'
            % (_csrf(config, session), event_id, _e(handler)))


def _dashboard(environ, conn, config, session, query):
    summary = stats(conn, 14)
    last = summary["last_event"]
    health = _health(config, environ)
    parts = ["<h2>Health</h2><p>Database: %s · spool: %s · server: %s · version %s</p>" % (
        _e(health["database"]), "events waiting" if _spool_waiting(config) else "empty", _e(health["server"]),
        _e(__version__)),
        "<p>Last event: %s</p>" % ('<a href="?view=status&amp;event=%d">%s</a>' % (last["id"], _e(last["received_at"]))
                                   if last else "none yet")]
    parts.append("<h2>Events per day</h2><table><tr><th>Day</th><th>Events</th><th>Repeats</th><th>Spooled</th></tr>%s"
                 "</table>" % "".join("<tr><td>%s</td><td>%d</td><td>%d</td><td>%d</td></tr>" % (
                     _e(d["day"]), d["events"], d["repeats"] or 0, d["spooled"]) for d in summary["per_day"]))
    failing = failing_deliveries(conn, 50)
    if failing:
        parts.append("<h2>Failed deliveries</h2><table><tr><th>Event</th><th>Handler</th><th>Attempts</th><th>Error"
                     "</th><th></th></tr>%s</table>" % "".join(
                         '<tr><td><a href="?view=status&amp;event=%d">%d</a></td><td>%s</td><td>%d</td><td class="failed">'
                         '%s</td><td>%s</td></tr>' % (eid, eid, _e(name), attempts, _e(error),
                                                      _retry_button(config, session, eid, name))
                         for eid, name, attempts, error in failing))
    events = find_events(conn, search=query or None, limit=50)
    parts.append('<h2>%s</h2><form method="get"><input type="hidden" name="view" value="status"><input type="search"'
                 ' name="q" value="%s" placeholder="email or transaction id"> <button>Search</button></form>' % (
                     "Events matching %s" % _e(query) if query else "Latest events", _e(query)))
    parts.append("<table><tr><th>Event</th><th>Received</th><th>Email</th><th>Transaction</th><th>Deliveries</th></tr>"
                 "%s</table>" % "".join(
                     '<tr><td><a href="?view=status&amp;event=%d">%d</a></td><td>%s</td><td>%s</td><td>%s</td><td>%s'
                     '</td></tr>' % (e["id"], e["id"], _e(e["received_at"][:19]), _e(e["contact_email"]),
                                     _e(e["transaction_id"]), " ".join('<span class="%s">%s %s</span>' % (
                                         _e(s), _e(h), _e(s)) for h, s in e["deliveries"].items()))
                     for e in events) if events else "<p>No events%s.</p>" % (" match" if query else " yet"))
    return _html("Status", "".join(parts), _nav(config, session))


def _event_page(conn, config, event_id, session):
    event = event_detail(conn, event_id)
    if event is None:
        raise _Page(404, _html("Not found", "<p>There is no event %d.</p>" % event_id, _nav(config, session)))
    rows = "".join("<tr><th>%s</th><td>%s</td></tr>" % (_e(k.replace("_", " ")), _e(event[k])) for k in (
        "id", "received_at", "method", "content_type", "remote_addr", "transaction_id", "contact_email", "contact_id",
        "repeats", "raw_bytes"))
    deliveries = "".join('<tr><td>%s</td><td class="%s">%s</td><td>%d</td><td>%s</td><td>%s</td></tr>' % (
        _e(d["handler"]), _e(d["status"]), _e(d["status"]), d["attempts"], _e(d["last_error"]),
        _retry_button(config, session, event_id, d["handler"]) if d["status"] == "failed" else "")
        for d in event["deliveries"])
    content = "<h2>Event %d</h2><table>%s</table>%s<h3>What Vbout sent</h3><pre>%s</pre>" % (
        event_id, rows, "<h3>Deliveries</h3><table><tr><th>Handler</th><th>Status</th><th>Attempts</th><th>Last error"
        "</th><th></th></tr>%s</table>" % deliveries if deliveries else "", _e(json_pretty(event["data"])))
    return _html("Event %d" % event_id, content, _nav(config, session))


def _admin_headers(body, headers):
    import base64
    import hashlib
    style = base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()
    base = [("Content-Type", "text/html; charset=utf-8"), ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"), ("X-Frame-Options", "DENY"), ("X-Content-Type-Options", "nosniff"),
            ("Referrer-Policy", "no-referrer"),
            ("Content-Security-Policy", "default-src 'none'; style-src 'sha256-%s'; form-action 'self';"
                                        " frame-ancestors 'none'; base-uri 'none'" % style)]
    names = {name.lower() for name, _ in headers}
    return [h for h in base if h[0].lower() not in names] + headers


###############################################################################
# WSGI application ############################################################
###############################################################################


def _seed_request_ids():
    """Each process numbers its requests' log ids from a random start: no system call per request."""
    global _request_numbers
    _request_numbers = count(int.from_bytes(os.urandom(6), "big"))


_seed_request_ids()
if hasattr(os, "register_at_fork"):  # every POSIX Python 3.7+
    os.register_at_fork(after_in_child=_after_fork)


def application(environ, start_response):
    """The PEP 3333 entry point: verify, parse, store, answer in JSON."""
    started = time.perf_counter()
    request_id = "%012x" % (next(_request_numbers) & 0xFFFFFFFFFFFF)
    method = environ.get("REQUEST_METHOD", "GET").upper()
    config, note, headers = None, "", []
    try:
        try:
            config = load_config(config_path(environ))
        except ConfigError as e:
            log(None, environ, "error", request_id, "config: %s" % e)
            raise HTTPError(500, "The listener is misconfigured; the details are in its log.") from None
        query = environ.get("QUERY_STRING", "")
        if "view=" in query and b"key" not in {name for name, _ in _query_tokens(query)}:
            status, headers, page = admin(environ, config, method, _client_address(environ, config))
            headers = _admin_headers(page, headers)
            start_response(STATUS_LINES.get(status, "%d Status" % status), headers)
            log(config, environ, "info", request_id, "%s %d admin %.1fms" % (
                _printable(method[:16]), status, (time.perf_counter() - started) * 1000))
            return [] if method == "HEAD" else [page]
        status, answer, note = _handle(environ, config, request_id, method)
    except HTTPError as e:
        status, headers = e.status, e.headers
        answer = {"ok": False, "error": e.message, "status": e.status}
        note = e.message
    except Exception:
        import traceback
        status = 500
        answer = {"ok": False, "error": "Internal error; the details are in the listener's log.", "status": 500}
        for line in traceback.format_exc().rstrip().splitlines():
            log(config, environ, "error", request_id, _printable(line))
    body = json_dumps(answer, spaced=True).encode("utf-8")
    headers = [("Content-Type", "application/json; charset=utf-8"), ("Content-Length", str(len(body))),
               ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff")] + list(headers)
    start_response(STATUS_LINES[status], headers)
    log(config, environ, "info" if status < 500 else "error", request_id, "%s %d %s%.1fms" % (
        _printable(method[:16]), status, (note + " ") if note else "", (time.perf_counter() - started) * 1000))
    return [] if method == "HEAD" else [body]


def _handle(environ, config, request_id, method):
    """Answer one request: (status, answer, log note); errors are raised as HTTPError."""
    secrets = config.secret or ((environ[SECRET_ENVIRON_KEY].encode("ascii"),)
                                if environ.get(SECRET_ENVIRON_KEY) else ())
    if not secrets:
        raise HTTPError(503, "No secret is set: set [listener] secret in config.ini"
                             " (or run `python3 listener.py init`).")
    remote = _client_address(environ, config)
    if config.allowed_ips and not _address_in(remote, config.allowed_ips):
        raise HTTPError(403, "This address may not call the listener.")
    query = environ.get("QUERY_STRING", "")
    tokens = _query_tokens(query)
    if not _key_ok(environ, tokens, secrets):
        raise HTTPError(403, "The key is missing or wrong.")
    if method not in ALLOWED_METHODS:
        raise HTTPError(405, "Method not allowed: Vbout calls with POST or GET.",
                        [("Allow", ", ".join(ALLOWED_METHODS))])
    limits = (config.max_params, config.max_depth)
    # The query without its `key` parameters: what a GET call stores (the key never is).
    without_key = "&".join(token for name, token in tokens if name != b"key")
    if method == "HEAD" or (method == "GET" and not without_key):
        return 200, _health(config, environ), "health"
    if method == "GET":
        tree = parse_query(query, *limits)
        raw, content_type = without_key.encode("latin-1"), None
    else:
        raw = _read_body(environ, config)
        content_type = environ.get("CONTENT_TYPE") or None
        tree = _parse_body(raw, content_type, limits)
    row = _event_row(tree, raw, method, content_type, remote)
    inline = [h for h in config.handlers if h.run == "inline"]
    if not inline:
        del tree  # the row holds it as JSON now: a large body's tree need not outlive that
    try:
        answer, problem, claim = save(config, row)
    except OSError as e:
        log(config, environ, "error", request_id, "neither the database nor the spool took the event: %s"
            % _printable(e))
        raise HTTPError(503, "The event could not be stored; try again later.") from None
    if problem is not None:
        log(config, environ, "warning", request_id, "database unavailable, event spooled: %s" % _printable(problem))
        return 200, dict({"ok": True}, **answer), "spooled"
    answer = dict({"ok": True}, **answer)
    note = "event=%d%s" % (answer["event_id"], " duplicate" if answer["duplicate"] else "")
    if inline and not answer["duplicate"]:
        event = Event(answer["event_id"], row["transaction_id"], row["received_at"], method, tree, content_type,
                      row["payload"])
        del tree
        outcomes = run_claimed(connect(config), config, [(event.id, h.name) for h in inline], claim,
                               lambda line: log(config, environ, "error", request_id, line), {event.id: event},
                               together=True)
        note += " " + " ".join("%s=%s" % (name, outcome[0]) for (_, name), outcome in outcomes.items())
        for item in config.respond_with:
            name, _, key = item.partition(".")
            status, _, _, result = outcomes[(event.id, name)]
            if status == "done" and result and key in result:
                answer.setdefault(name, {})[key] = result[key]
    return 200, answer, note


def _parse_body(raw, content_type, limits):
    """The tree of a POST body, by its Content-Type."""
    kind, params = _content_type(content_type)
    charset = params.get("charset", "utf-8")
    try:
        import codecs
        codecs.lookup(charset)
    except LookupError:
        raise HTTPError(415, "The charset in Content-Type is not supported.") from None
    if not raw:
        raise HTTPError(400, "The request body is empty.")
    if kind in ("", "application/x-www-form-urlencoded"):
        return parse_form(raw, *limits, charset=charset)
    if kind == "application/json" or kind.endswith("+json"):
        return parse_json(raw, *limits, charset=charset)
    if kind == "multipart/form-data":
        return parse_multipart(raw, content_type, *limits, charset=charset)
    raise HTTPError(415, "Unsupported Content-Type: send application/x-www-form-urlencoded,"
                         " multipart/form-data or application/json.")


def _read_body(environ, config):
    """The request body, refused past max_body_bytes without reading it when the length says so."""
    limit = config.max_body_bytes
    stream = environ["wsgi.input"]
    length = (environ.get("CONTENT_LENGTH") or "").strip()
    too_large = HTTPError(413, "The body is larger than %d bytes (max_body_bytes)." % limit)
    if length:
        if not length.isdigit():
            raise HTTPError(400, "Content-Length is not a number.")
        size = int(length)
        if size > limit:
            raise too_large
        chunks, left = [], size
        while left > 0:
            chunk = stream.read(left)
            if not chunk:
                raise HTTPError(400, "The body ended before Content-Length bytes.")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
    if not (chunked or environ.get("wsgi.input_terminated")):
        raise HTTPError(411, "Content-Length is required.")
    chunks, size = [], 0
    while size <= limit:
        chunk = stream.read(min(65536, limit + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > limit:
        raise too_large
    return b"".join(chunks)


def _query_tokens(query):
    """[(decoded name as bytes, raw token)] of a query string, empty tokens skipped."""
    tokens = []
    for token in query.split("&"):
        if token:
            name = token.partition("=")[0]
            tokens.append((_url_decode(name), token))
    return tokens


def _url_decode(text):
    """php_url_decode of a latin-1 'bytes as text' string, as bytes."""
    raw = text.encode("latin-1", "replace").replace(b"+", b" ")
    if b"%" not in raw:
        return raw
    from urllib.parse import unquote_to_bytes
    return unquote_to_bytes(raw)


def _key_ok(environ, tokens, secrets):
    """Whether the request carries one of the secrets (header, else the query's `key`), in constant time."""
    given = environ.get("HTTP_X_LISTENER_KEY")
    if given is not None:
        given = given.encode("latin-1", "replace")
    else:
        for name, token in tokens:
            if name == b"key":
                given = _url_decode(token.partition("=")[2])  # the last one wins, as in PHP
    if not given:
        return False
    ok = False
    for secret in secrets:
        ok |= _compare_digest(given, secret)
    return ok


try:
    # hmac.compare_digest itself, without loading OpenSSL on every CGI request (hmac imports _hashlib).
    from _operator import _compare_digest
except ImportError:  # pragma: no cover
    from hmac import compare_digest as _compare_digest


def _client_address(environ, config):
    """REMOTE_ADDR, or the first untrusted X-Forwarded-For hop when the peer is a trusted proxy."""
    remote = environ.get("REMOTE_ADDR", "")
    forwarded = environ.get("HTTP_X_FORWARDED_FOR")
    if forwarded and config.trusted_proxies and _address_in(remote, config.trusted_proxies):
        for hop in reversed([h.strip() for h in forwarded.split(",") if h.strip()]):
            if not _address_in(hop, config.trusted_proxies):
                return hop
    return remote


def _address_in(address, networks):
    import ipaddress
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return False
    return any(ip in net for net in networks)


def _health(config, environ):
    """The answer to a call that carries only the key."""
    try:
        connect(config)
        database = "ok"
    except Exception:
        database = "unavailable"
    return {"ok": True, "status": "ready", "database": database, "server": _server_kind(environ),
            "version": __version__}


def _server_kind(environ):
    if "mod_wsgi.version" in environ:
        return "mod_wsgi " + ("daemon" if environ.get("mod_wsgi.process_group") else "embedded")
    if os.environ.get("IN_PASSENGER") or "passenger.hijack" in environ:
        return "passenger"
    if environ.get("wsgi.run_once"):  # a process per request (wsgiref's server sets GATEWAY_INTERFACE too)
        return "cgi"
    return str(environ.get("SERVER_SOFTWARE", "wsgi")).split("/")[0][:40] or "wsgi"


def _text_value(value, limit=320):
    if isinstance(value, bool) or value is None or isinstance(value, (dict, list)):
        return None
    text = str(value).strip()
    return text[:limit].encode("utf-8", "replace").decode("utf-8") if text else None


def _event_row(tree, raw, method, content_type, remote):
    """The events row for a parsed call."""
    contact = tree.get("contact")
    contact = contact if isinstance(contact, dict) else {}
    email = contact.get("email") if "email" in contact else tree.get("email")
    payload = json_dumps(tree)
    try:
        payload.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a JSON \ud800 escape
        payload = json_dumps(tree, ensure_ascii=True)
    row = {
        "transaction_id": _text_value(tree.get("transactionid")),
        "received_at": utc_now(),
        "method": method,
        "content_type": (content_type or "")[:200] or None,
        "remote_addr": remote[:64] or None,
        "payload": payload,
        "raw_body": raw,
        "contact_email": _text_value(email),
        "contact_id": _text_value(contact.get("id")),
        "dedupe_key": None,
    }
    if method == "GET" and row["transaction_id"] is None:
        import hashlib  # only GET calls pay for it: they have no transactionid to dedupe on
        canonical = json_dumps(tree, ensure_ascii=True, sort_keys=True).encode("ascii")
        row["dedupe_key"] = hashlib.sha256(canonical).hexdigest()
    return row


###############################################################################
# CGI and command line ########################################################
###############################################################################


class _CGIInput:
    """stdin for a CGI request, counting what the application read."""

    def __init__(self, stream):
        self.stream, self.consumed = stream, 0

    def read(self, size=-1):
        data = self.stream.read(size)
        self.consumed += len(data)
        return data

    def readline(self, size=-1):
        data = self.stream.readline(size)
        self.consumed += len(data)
        return data

    def __iter__(self):
        return iter(self.readline, b"")

    def drain(self, length, cap):
        """Read what is left of the body (up to cap): under mod_cgid an unread body cuts the answer."""
        try:
            left = min(int(length or 0) - self.consumed, cap)
        except ValueError:
            return
        while left > 0:
            chunk = self.stream.read(min(left, 65536))
            if not chunk:
                return
            left -= len(chunk)
            self.consumed += len(chunk)


def run_cgi(app=None):
    """Serve one request as a CGI script (RFC 3875), without importing wsgiref.handlers."""
    app = app or application
    # A request's `Proxy:` header arrives as HTTP_PROXY and must not redirect anything (httpoxy).
    os.environ.pop("HTTP_PROXY", None)
    environ = {k: v.encode(sys.getfilesystemencoding(), "surrogateescape").decode("latin-1")
               for k, v in os.environ.items()}  # PEP 3333: "bytes as latin-1 text", as wsgiref does
    stdin = _CGIInput(sys.stdin.buffer)
    environ.update({
        "wsgi.input": stdin, "wsgi.errors": sys.stderr, "wsgi.version": (1, 0),
        "wsgi.multithread": False, "wsgi.multiprocess": True, "wsgi.run_once": True,
        "wsgi.url_scheme": "https" if environ.get("HTTPS", "off").lower() in ("on", "1", "yes") else "http",
    })
    response, chunks = [], []

    def start_response(status, headers, exc_info=None):
        if exc_info and response:
            raise exc_info[1].with_traceback(exc_info[2])
        response[:] = [status, headers]
        return chunks.append

    result = app(environ, start_response)
    try:
        for chunk in result:
            chunks.append(chunk)
    finally:
        if hasattr(result, "close"):
            result.close()
    stdin.drain(environ.get("CONTENT_LENGTH"), DRAIN_CAP)
    status, headers = response
    head = "Status: %s\r\n%s\r\n" % (status, "".join("%s: %s\r\n" % h for h in headers))
    out = sys.stdout.buffer
    out.write(head.encode("latin-1") + b"".join(chunks))
    out.flush()


def _load_or_exit(path):
    try:
        return load_config(path)
    except ConfigError as e:
        print("error: %s" % e, file=sys.stderr)
        raise SystemExit(2)


def cmd_serve(args):
    """Run a local threaded server (wsgiref) on 127.0.0.1:8080 using config.ini."""
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
    path = args.config or config_path()
    config = _load_or_exit(path)
    extra = {}
    if args.config:
        extra[CONFIG_ENV] = os.path.abspath(args.config)
    secret = config.secret[0].decode("ascii") if config.secret else None
    if secret is None:
        import secrets
        secret = extra[SECRET_ENVIRON_KEY] = secrets.token_urlsafe(24)

    def app(environ, start_response):
        environ.update(extra)
        return application(environ, start_response)

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args):  # the application logs one line per request itself
            pass

    httpd = make_server(args.host, args.port, app, server_class=Server, handler_class=Quiet)
    host = "[%s]" % args.host if ":" in args.host else args.host
    url = "http://%s:%d/listener.py?key=%s" % (host, httpd.server_port, secret)
    print("Vbout listener %s serving on http://%s:%d/ (config: %s)" % (
        __version__, host, httpd.server_port, config.label), flush=True)
    if SECRET_ENVIRON_KEY in extra:
        print("No secret is configured: this run accepts a temporary one.", flush=True)
    print("Send Vbout's calls to: %s" % url, flush=True)
    print("Events are stored in: %s" % config.database, flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
    return 0


def cmd_init(args):
    """Write a strong secret into config.ini, create the data folder, print the URL for Vbout."""
    import secrets
    path = args.config or DEFAULT_CONFIG
    if not os.path.exists(path):
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8") as f:
            f.write(config_template())
        print("Wrote %s" % path)
    config = _load_or_exit(path)
    if config.secret:
        secret = config.secret[0].decode("ascii")
        print("A secret is already set in %s [listener] secret; left as it is." % path)
    else:
        secret = secrets.token_urlsafe(32)
        _write_secret(path, secret)
        config = _load_or_exit(path)
        print("Wrote a new secret to %s [listener] secret." % path)
    try:
        connect(config)
    except StorageError as e:
        print("error: %s: %s (hint: make the folder writable by the web server's user)" % (
            config.database, e), file=sys.stderr)
        return 1
    print("The database is ready: %s" % config.database)
    base = args.url or "https://YOUR-SITE/PATH/TO/listener.py"
    print("Paste this URL into Vbout's \"Synch Contact to Third Party\" step:\n  %s?key=%s" % (base, secret))
    return 0


def _write_secret(path, secret):
    """Set [listener] secret in a config file, keeping every other line and comment as it was."""
    with open(path, encoding="utf-8-sig") as f:
        lines = f.read().splitlines()
    section, done, header_at = None, False, None
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            section = stripped[1:-1].strip()
            if section == "listener":
                header_at = i
            continue
        if section == "listener" and not stripped.startswith(("#", ";")):
            name = stripped.replace(":", "=").partition("=")[0].strip()
            if name == "secret":
                lines[i] = "secret = %s" % secret
                done = True
                break
    if not done:
        if header_at is None:
            lines += ["", "[listener]"]
            header_at = len(lines) - 1
        lines.insert(header_at + 1, "secret = %s" % secret)
    tmp = "%s.%d.tmp" % (path, os.getpid())
    mode = os.stat(path).st_mode & 0o777
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def config_template():
    """The text of config.ini: every key at its default with its help, and each shipped handler's
    section commented out with its own keys (from the module's SETTINGS)."""
    import textwrap

    def comment(text, prefix="# "):
        return [prefix + line for line in textwrap.wrap(text, 100 - len(prefix))]

    out = ["# Vbout listener settings. Relative paths are relative to this file's folder.",
           "# Every key is listed at its default; `python3 listener.py check` tells what is wrong.", ""]
    for section, title in (("listener", "[listener]"), ("handlers", "[handlers]")):
        out.append(title)
        for key in KEYS.values():
            if key.section == section:
                out += comment(key.help) + [("%s = %s" % (key.name, key.default)).rstrip(), ""]
    out += comment("Each handler named in [handlers] enabled reads its own [handler:NAME] section. Besides"
                   " the keys of its module, any handler section may set:")
    for key in KEYS.values():
        if key.section == "handler:*":
            out += comment("%s: %s" % (key.name, key.help), "#   ")
    out.append("")
    for name in sorted(f[:-3] for f in os.listdir(HANDLERS_DIR) if f.endswith(".py") and f != "__init__.py"):
        module = _handler_module(name, "handlers/%s.py" % name)
        doc = (module.__doc__ or name).strip().splitlines()[0]
        out += ["# --- %s: %s" % (name, doc), "# [handler:%s]" % name]
        for key, (default, help) in getattr(module, "SETTINGS", {}).items():
            out += comment(help, "#   ")
            out += [("# " + line).rstrip() for line in ("%s = %s" % (key, default)).splitlines()]
        out.append("")
    return "\n".join(out)


def cmd_spool(args):
    """Move spooled events into the database (for cron): silent when there is nothing to do."""
    config = _load_or_exit(args.config or config_path())
    try:
        imported, duplicates, bad = spool_import(config)
    except Exception as e:
        print("error: the spool could not be imported: %s" % e, file=sys.stderr)
        return 1
    if imported or duplicates or bad:
        print("imported %d spooled events (%d already stored, %d unreadable lines kept in %s.bad)" % (
            imported, duplicates, bad, config.spool_file))
    return 0


def _delivery_run(args, kind, event_id=None, handler_name=None):
    """Claim and run deliveries; print what still fails. Exit status 1 when something does."""
    config = _load_or_exit(args.config or config_path())
    if handler_name is not None and config.handler(handler_name) is None:
        print("error: %r is not in [handlers] enabled of %s" % (handler_name, config.label), file=sys.stderr)
        return 2
    conn = connect(config)
    if event_id is not None and not conn.execute("SELECT 1 FROM events WHERE id = ?", (event_id,)).fetchone():
        print("error: there is no event %d" % event_id, file=sys.stderr)
        return 2
    errors = lambda line: log(config, None, "error", "cli", line)  # noqa: E731
    ran = {}
    while True:
        claimed, claim = claim_deliveries(conn, config, kind, event_id, handler_name)
        if not claimed:
            break
        ran.update(run_claimed(conn, config, claimed, claim, errors))
        if kind == "replay":
            break
    failed = [(k, o) for k, o in ran.items() if o[0] == "failed"]
    if kind == "replay":
        for (eid, name), (status, error, duration, _) in ran.items():
            print("event %d %s: %s%s (%.0f ms)" % (eid, name, status, ": " + error if error else "", duration))
        return 1 if failed else 0
    still = failing_deliveries(conn)
    for eid, name, attempts, error in still:
        print("event %d %s: failed %d time%s: %s" % (eid, name, attempts, "" if attempts == 1 else "s", error))
    return 1 if still else 0


def cmd_deliver(args):
    """Run pending deliveries (deferred handlers, spooled events): for cron; silent when all succeed."""
    return _delivery_run(args, "pending")


def cmd_retry(args):
    """Retry failed deliveries that are due, with exponential backoff, up to [handlers] max_attempts."""
    return _delivery_run(args, "failed")


def cmd_replay(args):
    """Run the handlers for one event again, on purpose, whatever they did before."""
    return _delivery_run(args, "replay", args.event_id, args.handler)


SERVER_PATH = "/usr/local/bin:/usr/bin:/bin"  # what a web server's PATH usually holds
SHEBANG = b"#!/usr/bin/env python3"


def doctor(path, url=None):
    """The deployment checks, as [(ok, text, fix)]: shared by `check` and the tests."""
    import shutil
    results = []

    def report(ok, good, bad=None, fix=None):
        results.append((True, good, None) if ok else (False, bad or good, fix))

    report(sys.version_info >= (3, 8), "Python %s (%s)" % (sys.version.split()[0], sys.executable),
           fix="use Python 3.8 or newer")
    server_python = shutil.which("python3", path=SERVER_PATH)
    report(server_python is not None, "a web server's PATH finds python3 for the shebang: %s" % server_python,
           "no python3 on a web server's usual PATH (%s)" % SERVER_PATH,
           "install python3 in /usr/bin, or put its full path on the first line of listener.py")
    try:
        import sqlite3
        report(sqlite3.sqlite_version_info >= SQLITE_MINIMUM, "SQLite %s" % sqlite3.sqlite_version,
               "SQLite %s is older than %s" % (sqlite3.sqlite_version, ".".join(map(str, SQLITE_MINIMUM))),
               "use a newer Python or one built with a newer SQLite")
    except ImportError:
        report(False, "", "this Python has no sqlite3 module", "use a Python built with sqlite3")
    with open(os.path.abspath(__file__), "rb") as f:
        source = f.read()
    report(source.startswith(SHEBANG + b"\n"), "listener.py starts with %s" % SHEBANG.decode(),
           "listener.py does not start with %s" % SHEBANG.decode(),
           "upload listener.py again in binary mode, unchanged")
    report(b"\r\n" not in source, "listener.py has Unix (LF) line endings",
           "listener.py has Windows (CRLF) line endings, from an FTP upload in text mode: the web server"
           " cannot run it", "upload it again in binary mode, or run: sed -i 's/\\r$//' listener.py")
    report(os.access(os.path.abspath(__file__), os.X_OK), "listener.py is executable",
           "listener.py is not executable", "chmod 755 listener.py")
    try:
        config = load_config(path)
    except ConfigError as e:
        report(False, "", "config: %s" % e, "edit the file as the hint says")
        return results
    report(True, "%s is valid" % config.label)
    if config.path:
        mode = os.stat(config.path).st_mode & 0o777
        report(not mode & 0o007, "%s is readable by its owner only (mode %o)" % (config.label, mode),
               "%s is readable by every user of this machine (mode %o)" % (config.label, mode),
               "chmod 600 %s (640 if the web server reads it through your group)" % config.label)
    secret = config.secret[0].decode() if config.secret else ""
    report(len(secret) >= 24 and len(set(secret)) >= 12, "[listener] secret is set and strong",
           "[listener] secret is empty: every call is refused" if not secret else
           "[listener] secret is short or repetitive: it could be guessed",
           "python3 listener.py init writes a strong one (24 or more random characters)")
    for name, label in (("database", "database"), ("spool_file", "spool")):
        folder = os.path.dirname(getattr(config, name))
        exists = os.path.isdir(folder)
        report(os.access(folder if exists else os.path.dirname(folder), os.W_OK),
               "the %s folder %s is writable" % (label, folder), "the %s folder %s is not writable" % (label, folder),
               "make it writable by the web server's user (chown it, or chmod 700)")
        if exists:
            mode = os.stat(folder).st_mode & 0o777
            report(not mode & 0o077, "the %s folder is private (mode %o)" % (label, mode),
                   "the %s folder %s is open to other users (mode %o)" % (label, folder, mode), "chmod 700 %s" % folder)
    for handler in config.handlers:
        report(True, "handler %s loads and its settings check (handlers/%s.py, %s)" % (
            handler.name, handler.module_name, handler.run))
    if url:
        _check_url(config, url, report)
    else:
        report(True, "the URL for Vbout: https://YOUR-SITE/PATH/TO/listener.py?key=%s (`check --url URL`"
                     " tells whether the private files are safe there)" % (secret or "SECRET"))
    return results


def _check_url(config, url, report):
    """Call the deployed listener, and try to download what must stay private."""
    import urllib.error
    import urllib.request
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def fetch(target):
        try:
            with opener.open(urllib.request.Request(target, headers={"User-Agent": "vbout-listener-check"}),
                             timeout=20) as response:
                return response.status, response.read(65536)
        except urllib.error.HTTPError as e:
            return e.code, b""
        except (OSError, ValueError) as e:
            return None, str(e).encode()

    base = url.split("?")[0]
    secret = config.secret[0].decode() if config.secret else ""
    status, body = fetch(base + "?key=" + secret)
    try:
        answer = json_loads(body)
    except ValueError:
        answer = {}
    report(status == 200 and answer.get("status") == "ready",
           "%s answers the health check (server: %s)" % (base, answer.get("server")),
           "%s does not answer the health check (status %s)" % (base, status),
           "open it in a browser: a 500 is explained in the web server's error log, a 403 means the key differs")
    folder = base.rsplit("/", 1)[0] + "/"
    private = [("config.ini", config.path), ("the database", config.database),
               ("the database's -wal file", config.database + "-wal"), ("the spool", config.spool_file),
               ("the log", config.log_file), ("handlers/", os.path.join(HERE, "handlers", "__init__.py")),
               (".htaccess", os.path.join(HERE, ".htaccess"))]
    for label, path in private:
        if not path:
            continue
        relative = os.path.relpath(os.path.abspath(path), HERE)
        if relative.startswith(".."):
            report(True, "%s is outside listener.py's folder" % label)
            continue
        target = folder + relative.replace(os.sep, "/")
        status, _ = fetch(target)
        report(status != 200, "%s is not served (%s answers %s)" % (label, target, status),
               "%s can be downloaded from %s" % (label, target),
               "the web server ignores .htaccess: move config.ini and data/ out of the document root"
               " (README.md, \"Keeping data out of the document root\")")
    report(True, "the URL for Vbout: %s?key=%s" % (base, secret or "SECRET"))


def cmd_check(args):
    """Check the deployment: Python, config.ini, secret, folders, handlers, shebang, the URL (--url)."""
    results = doctor(args.config or config_path(), args.url)
    for ok, what, fix in results:
        print(("ok: %s" % what) if ok else ("problem: %s (fix: %s)" % (what, fix)))
    return 0 if all(ok for ok, _, _ in results) else 1


def _progress(label):
    """A progress bar on a terminal's stderr (nothing when output goes to a file or cron)."""
    if not sys.stderr.isatty():
        return None

    def show(done, total):
        width = 30
        filled = int(width * done / total) if total else width
        sys.stderr.write("\r%s [%s%s] %d/%d" % (label, "#" * filled, "." * (width - filled), done, total))
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()
    return show


def _print_json(value):
    print(json_dumps(value, spaced=True))


def _event_line(e):
    states = " ".join("%s=%s" % item for item in e["deliveries"].items())
    return "%6d  %s  %-4s  %-24s  %-32s %s%s" % (
        e["id"], e["received_at"][:19] + "Z", e["method"], (e["transaction_id"] or "-")[:24],
        (e["contact_email"] or "-")[:32], states, "  (+%d repeats)" % e["repeats"] if e["repeats"] else "")


def cmd_events(args):
    """Recent events, one line each, with filters; `events show ID`; `events export --format csv|jsonl`."""
    config = _load_or_exit(args.config or config_path())
    conn = connect(config)
    try:
        since, until = (parse_when(args.since) if args.since else None), (parse_when(args.until) if args.until else None)
    except ValueError as e:
        print("error: %s" % e, file=sys.stderr)
        return 2
    if args.action == "show":
        event = event_detail(conn, args.event_id)
        if event is None:
            print("error: there is no event %d" % args.event_id, file=sys.stderr)
            return 1
        if args.json:
            _print_json(event)
            return 0
        for key in ("id", "received_at", "method", "content_type", "remote_addr", "transaction_id", "contact_email",
                    "contact_id", "repeats", "raw_bytes"):
            print("%-15s %s" % (key + ":", event[key]))
        for d in event["deliveries"]:
            print("delivery:       %s %s, %d attempt(s)%s" % (d["handler"], d["status"], d["attempts"],
                                                             ": " + d["last_error"] if d["last_error"] else ""))
        print(json_pretty(event["data"]))
        return 0
    if args.action == "export":
        out = open(args.output, "w", encoding="utf-8", newline="") if args.output else sys.stdout
        total = conn.execute("SELECT count(*) FROM events").fetchone()[0]
        show = _progress("exporting") if args.output else None
        try:
            for n, chunk in enumerate(export_events(conn, args.format, since, until, args.email), 1):
                out.write(chunk)
                if show and (n % 200 == 0 or n == total):
                    show(min(n, total), total)
        finally:
            if args.output:
                out.close()
        return 0
    events = find_events(conn, since, until, args.email, args.transaction, args.status, limit=args.limit)
    if args.json:
        _print_json(events)
    for e in ([] if args.json else events):
        print(_event_line(e))
    return 0


def cmd_stats(args):
    """Events per day, repeats, spooled, deliveries by handler and status, the last event received."""
    config = _load_or_exit(args.config or config_path())
    summary = stats(connect(config), args.days)
    if args.json:
        _print_json(summary)
        return 0
    last = summary["last_event"]
    print("events: %d; last received %s" % (summary["events"], "%s (event %d)" % (last["received_at"], last["id"])
                                            if last else "never"))
    print("day         events  repeats  spooled")
    for day in summary["per_day"]:
        print("%s  %6d  %7d  %7d" % (day["day"], day["events"], day["repeats"] or 0, day["spooled"]))
    for d in summary["deliveries"]:
        print("deliveries: %s %s: %d" % (d["handler"], d["status"], d["count"]))
    return 0


def cmd_prune(args):
    """Delete events (and their deliveries) older than --older-than, e.g. 90d; then VACUUM."""
    config = _load_or_exit(args.config or config_path())
    try:
        cutoff = parse_when(args.older_than)
    except ValueError as e:
        print("error: %s" % e, file=sys.stderr)
        return 2
    removed = prune(config, cutoff, args.contacts, _progress("pruning"))
    print("; ".join("%s: %d removed" % item for item in removed.items()) + " (received before %s)" % cutoff)
    return 0


def cmd_forget(args):
    """Erase a person everywhere the listener keeps them (events, deliveries, contact tables, handler files, spool)."""
    config = _load_or_exit(args.config or config_path())
    for line in forget(config, args.email, _progress("handlers")):
        print(line)
    return 0


def cmd_send_sample(args):
    """Post a realistic Vbout call to URL (form by default) and print the answer: test a deployment before Vbout."""
    import urllib.error
    import urllib.request
    url = args.url
    if "key=" not in url:
        config = _load_or_exit(args.config or config_path())
        if config.secret:
            url += ("&" if "?" in url else "?") + "key=" + config.secret[0].decode()
    tree = sample_tree()
    if args.get:
        flat = {"email": tree["contact"]["email"], "first_name": "Ana", "country": "US"}
        request = urllib.request.Request(url + "&" + encode_form(flat).decode())
    elif args.json:
        request = urllib.request.Request(url, json_dumps(tree).encode(), {"Content-Type": "application/json"})
    else:
        request = urllib.request.Request(url, encode_form(tree), {"Content-Type": "application/x-www-form-urlencoded"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=30) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read()
    except (OSError, ValueError) as e:
        print("error: %s" % e, file=sys.stderr)
        return 1
    print("%d %s" % (status, body.decode("utf-8", "replace")))
    return 0 if 200 <= status < 300 else 1


def cmd_learn(args):
    """Summarise the shapes received (sections, custom fields, content types, GET parameters) and print a field map."""
    config = _load_or_exit(args.config or config_path())
    seen = learn(connect(config), args.limit)
    if args.json:
        _print_json(dict(seen, field_map=field_map(seen)))
        return 0
    print("events read: %d" % seen["events"])
    for title, key in (("content types", "content_types"), ("sections", "sections"),
                       ("custom fields", "fields"), ("GET parameters", "get_parameters")):
        if seen[key]:
            print("%s: %s" % (title, ", ".join("%s (%d)" % item for item in sorted(seen[key].items(),
                                                                                  key=lambda i: -i[1]))))
    lines = field_map(seen)
    print("\nFor a forward handler (map) or a csv handler (columns), paste:")
    print("map =\n" + "\n".join("    " + line for line in lines))
    return 0


def cmd_tail(args):
    """Follow new events as they arrive, one line each (Ctrl-C stops)."""
    config = _load_or_exit(args.config or config_path())
    conn = connect(config)
    last = conn.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0]
    for e in reversed(find_events(conn, limit=args.lines)):
        print(_event_line(e), flush=True)
    try:
        while True:
            time.sleep(args.interval)
            conn = connect(config)
            for e in find_events(conn, after_id=last, limit=1000):
                print(_event_line(e), flush=True)
                last = e["id"]
    except KeyboardInterrupt:
        return 0


def main(argv=None):
    """Serve a CGI request when run by a web server, else the command line."""
    if argv is None and "GATEWAY_INTERFACE" in os.environ:
        run_cgi()
        # The answer is written and the event is on disk: close the database (SQLite checkpoints
        # its WAL), then skip the interpreter's teardown, about 2 ms of every CGI request.
        close_connections()
        sys.stderr.flush()
        os._exit(0)
    import argparse
    parser = argparse.ArgumentParser(
        prog="listener.py", description="Receive and keep Vbout's \"Synch Contact to Third Party\" calls.")
    parser.add_argument("--version", action="version", version="%(prog)s " + __version__)
    parser.add_argument("--config", metavar="PATH", help="config file (default: $%s, else config.ini"
                        " beside listener.py)" % CONFIG_ENV)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name, func):
        """A subcommand whose help is func's docstring."""
        p = commands.add_parser(name, help=func.__doc__, description=func.__doc__)
        p.set_defaults(func=func)
        return p

    p = command("serve", cmd_serve)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080; 0 picks one)")
    p = command("init", cmd_init)
    p.add_argument("--url", help="the public URL of listener.py, to print the exact URL for Vbout")
    command("spool", cmd_spool)
    command("deliver", cmd_deliver)
    command("retry", cmd_retry)
    p = command("check", cmd_check)
    p.add_argument("--url", help="the public URL of listener.py: call it and try to download the private files")
    p = command("replay", cmd_replay)
    p.add_argument("event_id", type=int, metavar="EVENT_ID", help="the event's id (events.id)")
    p.add_argument("--handler", metavar="NAME", help="only this handler (default: every enabled one)")
    p = command("events", cmd_events)
    actions = p.add_subparsers(dest="action", metavar="[show ID | export]")
    show = actions.add_parser("show", help="one event: its fields, deliveries and tree")
    show.add_argument("event_id", type=int, metavar="ID")
    export = actions.add_parser("export", help="all matching events as CSV (flattened) or JSON lines")
    export.add_argument("--format", choices=("csv", "jsonl"), default="csv")
    export.add_argument("--output", metavar="FILE", help="write to FILE (default: standard output)")
    for q in (p, show, export):
        q.add_argument("--json", action="store_true", help="JSON output, for scripts")
        q.add_argument("--since", help="received since: 7d, 24h, 30m or 2026-11-01")
        q.add_argument("--until", help="received before: same forms")
        q.add_argument("--email", help="the contact's email")
    p.add_argument("--transaction", metavar="ID", help="a transactionid")
    p.add_argument("--status", choices=("failed", "pending", "done", "skipped", "running"),
                   help="events with a delivery in this status")
    p.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    p.set_defaults(action=None)
    p = command("stats", cmd_stats)
    p.add_argument("--days", type=int, default=14, help="days per day counts go back (default 14)")
    p.add_argument("--json", action="store_true", help="JSON output, for scripts")
    p = command("prune", cmd_prune)
    p.add_argument("--older-than", required=True, metavar="AGE", help="90d, 12w, 24h or a date")
    p.add_argument("--contacts", action="store_true", help="also the contacts handler's contacts not seen since")
    p = command("forget", cmd_forget)
    p.add_argument("email")
    p = command("send-sample", cmd_send_sample)
    p.add_argument("url", metavar="URL", help="the listener's URL; without key=, the configured secret is added")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--json", action="store_true", help="send JSON instead of a form")
    kind.add_argument("--get", action="store_true", help="send a GET with shortcode-style parameters")
    p = command("learn", cmd_learn)
    p.add_argument("--limit", type=int, default=1000, help="how many recent events to read (default 1000)")
    p.add_argument("--json", action="store_true", help="JSON output, for scripts")
    p = command("tail", cmd_tail)
    p.add_argument("--lines", type=int, default=10, help="recent events shown first (default 10)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between looks (default 1)")
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
