#!/usr/bin/env python3
"""Vbout listener: receives Vbout's "Synch Contact to Third Party" calls and keeps them.

Standard library only, Python 3.8 to 3.13. Every call is checked against a secret, parsed
exactly as PHP's parse_str would, stored durably in SQLite before it is answered, and then
handed to the handlers switched on in config.ini.

    WSGI:  application                      (mod_wsgi, Passenger, gunicorn listener:application)
    CGI:   upload the folder, make listener.py executable, call listener.py?key=SECRET
    CLI:   python3 listener.py serve | init | spool | --help

config.ini is read from the file named by VBOUT_LISTENER_CONFIG (in the WSGI environ or the
process environment), else from config.ini beside this file; without one, the embedded
defaults apply. Relative paths in it are relative to the config file's folder.
"""

import os
import sys
import time
from itertools import repeat

__version__ = "1.0.0"

###############################################################################
# Constants and defaults ######################################################
###############################################################################

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(HERE, "config.ini")
CONFIG_ENV = "VBOUT_LISTENER_CONFIG"
SECRET_ENVIRON_KEY = "vbout_listener.secret"  # set by `serve` for a run without a configured secret
ALLOWED_METHODS = ("GET", "HEAD", "POST")
DRAIN_CAP = 16 * 1024 * 1024  # bytes a CGI reads and discards before answering an error (mod_cgid)
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1
STATUS_LINES = {
    200: "200 OK", 400: "400 Bad Request", 403: "403 Forbidden", 404: "404 Not Found",
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


class Config:
    """The settings of one config file, checked, with paths made absolute."""

    def __init__(self, path, values, sections):
        self.path = path
        self.folder = os.path.dirname(os.path.abspath(path)) if path else HERE
        self.sections = sections  # the raw text of every section, for handlers
        for (section, name), value in values.items():
            if section == "listener":
                setattr(self, name, value)
        for name in ("database", "spool_file", "log_file"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, os.path.join(self.folder, os.path.expanduser(value)))

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
    sections, current, last = {}, None, None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        where = "%s line %d" % (path, number)
        if not stripped or stripped[0] in "#;":
            last = None if not stripped else last
            continue
        if line[0] in " \t" and last is not None:
            current[last] += "\n" + stripped
            continue
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
        if name != "listener":
            raise ConfigError("%s [%s]: unknown section (hint: the settings go under [listener])"
                              % (label, name))
    values = {}
    for section in ("listener",):
        given = dict(sections.get(section, {}))
        for (sec, name), key in KEYS.items():
            if sec != section:
                continue
            text = given.pop(name, key.default)
            try:
                values[(sec, name)] = key.parse(text)
            except ValueError as e:
                raise ConfigError("%s [%s] %s: %s %s" % (label, sec, name, _quote_value(name, text), e)) from None
        for name in given:
            close = [n for (s, n) in KEYS if s == section and _similar(n, name)]
            hint = ("did you mean %r?" % close[0]) if close else (
                "the keys are: " + ", ".join(n for (s, n) in KEYS if s == section))
            raise ConfigError("%s [%s] %s: unknown key (hint: %s)" % (label, section, name, hint))
    return Config(path, values, sections)


def _quote_value(name, text):
    if name == "secret":
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
    return _build_tree(_form_pairs(body, charset, max_params), max_depth)


def _form_pairs(body, charset, max_params):
    """Split and percent-decode a form body into (name, separator, value) triples."""
    # '+' is a space and only '&' separates (php_default_treat_data, arg_separator.input).
    body = body.replace(b"+", b" ")
    if body.count(b"&") >= max_params:
        tokens = body.split(b"&")  # PHP's strtok skips empty tokens: they are not parameters
        if len(tokens) - tokens.count(b"") > max_params:
            raise LimitExceeded("the body has more than %d parameters (max_params)" % max_params)
    if not body:
        return []
    seps = _free_bytes(body) if _whole_decode_ok(charset) else None
    if seps is not None:
        # A name must not gain an '=' from %3D before it is split from its value at the raw one.
        protect = (b"%3D" in body or b"%3d" in body) and _encoded_equals_in_a_name(body)
        decoded = _decode_whole(body, seps, protect)
        if decoded is not None:
            text = decoded.decode(charset, "replace")
            del decoded  # each copy of a large body is let go as soon as the next one exists
            tokens = text.split(chr(seps[0]))
            del text
            if not protect:
                # Lazily, in C: the tree keeps the values while names and tokens go (peak memory).
                return map(str.partition, tokens, repeat("="))
            guard = chr(seps[1])
            return [(n.replace(guard, "="), e, v.replace(guard, "="))
                    for n, e, v in map(str.partition, tokens, repeat("="))]
    # The exact path, for invalid '%' escapes or a charset that is not one byte per ASCII char.
    from urllib.parse import unquote_to_bytes  # the same rules as php_url_decode once '+' is done
    triples = []
    for token in body.split(b"&"):
        if token:
            name, sep, value = token.partition(b"=")
            triples.append((unquote_to_bytes(name).decode(charset, "replace"), "=" if sep else "",
                            unquote_to_bytes(value).decode(charset, "replace")))
    return triples


def _encoded_equals_in_a_name(body):
    """Whether some name (before its pair's first raw '=') holds %3D. No regex: `re` costs a CGI 5 ms."""
    for escape in (b"%3D", b"%3d"):
        at = body.find(escape)
        while at >= 0:
            if body.find(b"=", body.rfind(b"&", 0, at) + 1, at) < 0:
                return True
            following = body.find(b"&", at)  # the rest of this pair is value: skip to the next one
            at = body.find(escape, following) if following >= 0 else -1
    return False


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
    found = []
    for b in (1, 2, 3, 4, 5, 6, 7, 8, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25):
        if bytes((b,)) not in body and (b"%%%02x" % b) not in body and (b"%%%02X" % b) not in body:
            found.append(b)
            if len(found) == 2:
                return found
    return None


def _decode_whole(body, seps, protect=False):
    """Percent-decode the whole body in one C call, with '&' turned into seps[0] beforehand.

    binascii.a2b_qp decodes '=XX': raw '=' becomes '=3D', '%' becomes '=', and raw CR and LF
    become escapes so that no soft line break can occur. An invalid escape would come out as
    '=' instead of PHP's literal '%': the length check sees it and the caller takes the exact
    path. With protect, %3D becomes seps[1], to be turned back into '=' after the split.
    """
    from binascii import a2b_qp
    data = body
    if protect:
        guard = bytes((seps[1],))
        data = data.replace(b"%3D", guard).replace(b"%3d", guard)
    data = data.replace(b"&", bytes((seps[0],))).replace(b"=", b"=3D")
    if b"\r" in data or b"\n" in data:
        data = data.replace(b"\r", b"=0D").replace(b"\n", b"=0A")
    data = data.replace(b"%", b"=")
    out = a2b_qp(data)
    if len(out) != len(data) - 2 * data.count(b"="):
        return None
    return out


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
    """For the fast path: None for an append ('' or ' '), a ']' or a NUL; else its int or _STR."""
    if key == "" or key == " " or "]" in key or "\x00" in key:
        return None
    number = _php_int_key(key)
    return _STR if number is None else number


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
        self.depths = {}  # prefix -> its number of groups
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
            self.depths.clear()
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
                    self.depths[name[:pos]] = depth - 1
            array, key = node, index
            number = None if index is None else _php_int_key(index)
            pos = close + 1
            if name[pos:pos + 1] != "[":
                break  # text after a closed group ends the name: a[b]c[d] is a[b]
        if key is None:
            self.append(array, value)
        else:
            self.set(array, key, value, number)

    def container(self, prefix, kinds):
        """The array a prefix leads to, found from its parent's cached array; None if not plain."""
        if prefix[-1:] != "]":
            return None
        j = prefix.rfind("[")
        parent = self.arrays.get(prefix[:j]) if j > 0 else None
        if parent is None:
            return None
        depth = self.depths[prefix[:j]] + 1
        if depth >= self.max_depth:
            return None
        key = prefix[j + 1:-1]
        kind = kinds.get(key)
        if kind is None:
            kind = kinds[key] = _key_kind(key) or False
        if kind is False:
            return None
        node = self.child(parent, key, None if kind is _STR else kind)
        self.arrays[prefix] = node
        self.depths[prefix] = depth
        return node


def _build_tree(triples, max_depth):
    """The PHP array made of decoded (name, separator, value) triples, as parse_form returns it."""
    tree = _Tree(max_depth)
    arrays, kinds, set_, add = tree.arrays, {}, tree.set, tree.add
    for name, _, value in triples:
        # The fast path: name is '<cached prefix>[<plain key>]'.
        j = name.rfind("[")
        if j > 0 and name[-1] == "]":
            last = name[j + 1:-1]
            kind = kinds.get(last)
            if kind is None:
                kind = kinds[last] = _key_kind(last) or False
            if kind is not False:
                prefix = name[:j]
                array = arrays.get(prefix)
                if array is None:
                    array = tree.container(prefix, kinds)
                if array is not None:
                    if kind is _STR and last not in array:
                        array[last] = value
                    else:
                        set_(array, last, value, None if kind is _STR else kind)
                    continue
        add(name, value)
    _to_json_shape(tree)
    return tree.top


def _to_json_shape(tree):
    """Turn arrays whose keys are 0..n-1 in order into lists, as json_encode does.

    Children were made after their parents: going backwards converts a child before the
    parent whose values it is copied into.
    """
    next_index = tree.next_index
    for array, parent, key in reversed(tree.created):
        n = len(array)
        if (n == 0 or next_index.get(id(array)) == n) and parent.get(key) is array:
            if n == 0 or list(array) == [str(i) for i in range(n)]:
                parent[key] = list(array.values())


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
            transaction_id TEXT UNIQUE,
            received_at TEXT NOT NULL,
            method TEXT NOT NULL,
            content_type TEXT,
            remote_addr TEXT,
            payload TEXT NOT NULL,
            raw_body BLOB,
            contact_email TEXT,
            contact_id TEXT,
            dedupe_key TEXT,
            spool_id TEXT UNIQUE
        )""",
        "CREATE INDEX events_received_at ON events (received_at)",
        "CREATE INDEX events_contact_email ON events (contact_email)",
        "CREATE INDEX events_dedupe_key ON events (dedupe_key, received_at)",
        """CREATE TABLE deliveries (
            event_id INTEGER NOT NULL REFERENCES events (id) ON DELETE CASCADE,
            handler TEXT NOT NULL,
            status TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            last_error TEXT,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (event_id, handler)
        )""",
        "CREATE INDEX deliveries_status ON deliveries (status, updated_at)",
    ],
]

EVENT_COLUMNS = ("transaction_id", "received_at", "method", "content_type", "remote_addr", "payload",
                 "raw_body", "contact_email", "contact_id", "dedupe_key", "spool_id")

try:
    from _thread import _local as _ThreadLocal  # threading.local without importing threading
except ImportError:  # pragma: no cover
    from threading import local as _ThreadLocal

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
    import sqlite3
    if create:
        # Made here first so that the file (and the -wal and -shm that copy its mode) is private.
        _private_folder(os.path.dirname(path))
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass
    try:
        conn = sqlite3.connect(path, timeout=config.busy_timeout, isolation_level=None)
    except sqlite3.Error as e:
        raise StorageError("cannot open the database: %s" % e) from None
    try:
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        if mode != "wal":
            conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=%s" % ("FULL" if config.durability == "full" else "NORMAL"))
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA cache_size=-1024")  # KiB: one event at a time needs little
        migrate(conn)
    except sqlite3.Error as e:
        conn.close()
        raise StorageError("cannot prepare the database: %s" % e) from None
    return conn


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
        self.conn.execute("BEGIN IMMEDIATE")
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


def store_event(conn, row, dedupe_window=0):
    """Insert an event row unless it repeats one: (event_id, duplicate)."""
    with transaction(conn):
        if row.get("transaction_id") is not None:
            found = conn.execute("SELECT id FROM events WHERE transaction_id = ?",
                                 (row["transaction_id"],)).fetchone()
            if found:
                return found[0], True
        elif row.get("dedupe_key") is not None and dedupe_window > 0:
            since = utc_now(time.time() - dedupe_window)
            found = conn.execute("SELECT id FROM events WHERE dedupe_key = ? AND received_at >= ?"
                                 " ORDER BY id DESC LIMIT 1", (row["dedupe_key"], since)).fetchone()
            if found:
                return found[0], True
        if row.get("spool_id") is not None:
            found = conn.execute("SELECT id FROM events WHERE spool_id = ?", (row["spool_id"],)).fetchone()
            if found:
                return found[0], True
        cursor = conn.execute("INSERT INTO events (%s) VALUES (%s)" % (
            ", ".join(EVENT_COLUMNS), ", ".join("?" * len(EVENT_COLUMNS))),
            [row.get(c) for c in EVENT_COLUMNS])
        return cursor.lastrowid, False


def save(config, row):
    """Store an event durably: in SQLite, else in the spool. Returns the answer's fields."""
    import sqlite3
    try:
        conn = connect(config)
        event_id, duplicate = store_event(conn, row, config.dedupe_window)
    except (sqlite3.Error, StorageError, OSError) as e:
        spool_append(config, row)  # raises OSError when the spool cannot take it either
        return {"event_id": None, "duplicate": False, "spooled": True}, e
    if _spool_waiting(config):
        try:
            spool_import(config, conn)
        except Exception:
            pass  # the spool stays for the next request or `listener.py spool`
    return {"event_id": event_id, "duplicate": duplicate}, None


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
            event_id, duplicate = store_event(conn, record, 0)
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
# WSGI application ############################################################
###############################################################################


def application(environ, start_response):
    """The PEP 3333 entry point: verify, parse, store, answer in JSON."""
    started = time.perf_counter()
    request_id = os.urandom(6).hex()
    method = environ.get("REQUEST_METHOD", "GET").upper()
    config, note, headers = None, "", []
    try:
        try:
            config = load_config(config_path(environ))
        except ConfigError as e:
            log(None, environ, "error", request_id, "config: %s" % e)
            raise HTTPError(500, "The listener is misconfigured; the details are in its log.") from None
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
    if not _key_ok(environ, query, secrets):
        raise HTTPError(403, "The key is missing or wrong.")
    if method not in ALLOWED_METHODS:
        raise HTTPError(405, "Method not allowed: Vbout calls with POST or GET.",
                        [("Allow", ", ".join(ALLOWED_METHODS))])
    limits = (config.max_params, config.max_depth)
    if method == "HEAD" or (method == "GET" and not _without_key(query)):
        return 200, _health(config), "health"
    if method == "GET":
        tree = parse_query(query, *limits)
        raw, content_type = _without_key(query).encode("latin-1"), None
    else:
        raw = _read_body(environ, config)
        content_type = environ.get("CONTENT_TYPE") or None
        tree = _parse_body(raw, content_type, limits)
    row = _event_row(tree, raw, method, content_type, remote)
    del tree  # the row holds it as JSON now; a large body's tree need not outlive that
    try:
        answer, problem = save(config, row)
    except OSError as e:
        log(config, environ, "error", request_id, "neither the database nor the spool took the event: %s"
            % _printable(e))
        raise HTTPError(503, "The event could not be stored; try again later.") from None
    if problem is not None:
        log(config, environ, "warning", request_id, "database unavailable, event spooled: %s" % _printable(problem))
        return 200, dict({"ok": True}, **answer), "spooled"
    return 200, dict({"ok": True}, **answer), "event=%d%s" % (
        answer["event_id"], " duplicate" if answer["duplicate"] else "")


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


def _without_key(query):
    """The query string with every `key` parameter taken out (it is never stored or logged)."""
    return "&".join(token for name, token in _query_tokens(query) if name != b"key")


def _key_ok(environ, query, secrets):
    """Whether the request carries one of the secrets, compared in constant time."""
    given = environ.get("HTTP_X_LISTENER_KEY")
    if given is not None:
        given = given.encode("latin-1", "replace")
    else:
        for name, token in _query_tokens(query):
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


def _health(config):
    """The answer to a call that carries only the key."""
    try:
        connect(config)
        database = "ok"
    except Exception:
        database = "unavailable"
    return {"ok": True, "status": "ready", "database": database, "version": __version__}


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
    """The text of a config.ini with every key at its default, each with its help."""
    import textwrap
    out = ["# Vbout listener settings. Relative paths are relative to this file's folder.", "", "[listener]"]
    for key in KEYS.values():
        out += ["# " + line for line in textwrap.wrap(key.help, 96)]
        out += [("%s = %s" % (key.name, key.default)).rstrip(), ""]
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
    p = commands.add_parser("serve", help=cmd_serve.__doc__, description=cmd_serve.__doc__)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080; 0 picks one)")
    p.set_defaults(func=cmd_serve)
    p = commands.add_parser("init", help=cmd_init.__doc__, description=cmd_init.__doc__)
    p.add_argument("--url", help="the public URL of listener.py, to print the exact URL for Vbout")
    p.set_defaults(func=cmd_init)
    p = commands.add_parser("spool", help=cmd_spool.__doc__, description=cmd_spool.__doc__)
    p.set_defaults(func=cmd_spool)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
