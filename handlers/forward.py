"""Sends each event to an HTTP(S) API, such as a CRM's, as JSON or as a form.

Without `map`, the whole event is sent: {"event_id", "transaction_id", "received_at", "data"}
(as a form: Vbout's own bracket notation). With `map`, only the named values are. A non-2xx
answer fails the delivery, with its status and the first 200 bytes; `listener.py retry` tries
again later. With `signing_secret`, requests are signed the Standard Webhooks way.
Environment proxies are ignored unless `proxy` is set: under CGI a request's `Proxy:` header
arrives as HTTP_PROXY (httpoxy) and must never redirect this traffic.
"""

import base64
import hashlib
import hmac
import json
import ssl
import time
import urllib.error
import urllib.request

SETTINGS = {
    "url": ("", "The API's URL (http:// or https://); required."),
    "method": ("POST", "POST, PUT or PATCH."),
    "format": ("json", "json: a JSON body. form: application/x-www-form-urlencoded."),
    "map": ("", "Lines `output name = event value` (contact.email, fields.First Name, lead-status.label)."
                " Empty: the whole event is sent."),
    "static": ("", "Lines `output name = fixed text` added to every request."),
    "headers": ("", "Lines `Header-Name: value`; ${NAME} takes an environment variable (never logged)."),
    "signing_secret": ("", "Signs requests (webhook-id, webhook-timestamp, webhook-signature); whsec_... or"
                           " any text; ${NAME} takes an environment variable."),
    "proxy": ("", "An HTTP(S) proxy URL to use; empty: none, whatever the environment says."),
    "verify_tls": ("yes", "Check the API's TLS certificate (keep yes)."),
}


class Options:
    def __init__(self, settings):
        self.url = settings.get("url", "").strip()
        if not self.url.lower().startswith(("http://", "https://")):
            raise settings.error("url", "is not an http:// or https:// URL", "https://api.example.com/contacts")
        self.method = settings.choice("method", "post", "put", "patch").upper()
        self.format = settings.choice("format", "json", "form")
        self.map = settings.pairs("map")
        self.static = settings.pairs("static")
        self.headers = settings.pairs("headers", ":")
        self.timeout = settings.timeout  # the handler's time budget ([handlers] or its own `timeout`)
        self.secret = settings.get("signing_secret", "").strip()
        self.proxy = settings.get("proxy", "").strip()
        self.verify = settings.flag("verify_tls")
        self.expand = settings.expand  # ${NAME} from the environment, at delivery time
        self.encode_form = settings.encode_form  # Vbout's own bracket notation


def check(settings):
    return Options(settings)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args):
        return None  # a 3xx is an answer like any other non-2xx: the delivery fails and says so


def handle(event, options):
    if options.map:
        payload = {name: event.get(path) for name, path in options.map}
    else:
        payload = {"event_id": event.id, "transaction_id": event.transaction_id,
                   "received_at": event.received_at, "data": event.data}
    payload.update(options.static)
    if options.format == "json":
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        content_type = "application/json"
    else:
        body = options.encode_form(payload)
        content_type = "application/x-www-form-urlencoded"
    headers = {"Content-Type": content_type, "User-Agent": "vbout-listener"}
    for name, value in options.headers:
        headers[name] = options.expand(value)
    if options.secret:
        headers.update(sign(options.expand(options.secret), str(event.id), int(time.time()), body))
    context = ssl.create_default_context()
    if not options.verify:
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    proxies = {"http": options.proxy, "https": options.proxy} if options.proxy else {}
    opener = urllib.request.build_opener(urllib.request.ProxyHandler(proxies), _NoRedirect(),
                                         urllib.request.HTTPSHandler(context=context))
    request = urllib.request.Request(options.url, data=body, headers=headers, method=options.method)
    try:
        with opener.open(request, timeout=options.timeout) as response:
            answer = response.read(1 << 20)
    except urllib.error.HTTPError as e:
        snippet = e.read(200).decode("utf-8", "replace")
        raise RuntimeError("HTTP %d from the API: %s" % (e.code, " ".join(snippet.split()))) from None
    try:
        result = json.loads(answer.decode("utf-8"))
    except ValueError:
        return None
    return result if isinstance(result, dict) else None


def sign(secret, message_id, timestamp, body):
    """Standard Webhooks headers: HMAC-SHA256 over 'id.timestamp.body', base64, as 'v1,<signature>'."""
    key = base64.b64decode(secret[len("whsec_"):]) if secret.startswith("whsec_") else secret.encode("utf-8")
    signed = ("%s.%d." % (message_id, timestamp)).encode("ascii") + body
    signature = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode("ascii")
    return {"webhook-id": message_id, "webhook-timestamp": str(timestamp), "webhook-signature": "v1," + signature}

