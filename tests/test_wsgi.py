"""The WSGI application: every status, each request shape, the answer and log shapes."""

import io
import json
import os
import stat
import wsgiref.validate

import pytest

import listener
from conftest import SECRET, call, vbout_body

FORM = "application/x-www-form-urlencoded"

# (id, method, query, content type, body, status, error text) — adnanh/webhook-style table.
REQUESTS = [
    ("form-post", "POST", "", FORM, b"transactionid=t1&contact[email]=a@b.c", 200, None),
    ("json-post", "POST", "", "application/json", b'{"transactionid": "t2"}', 200, None),
    ("json-post-suffix", "POST", "", "application/vnd.vbout+json", b'{"a": 1}', 200, None),
    ("multipart-post", "POST", "", "multipart/form-data; boundary=XX",
     b'--XX\r\nContent-Disposition: form-data; name="contact[email]"\r\n\r\nm@x.y\r\n--XX--\r\n', 200, None),
    ("get-shortcodes", "GET", "email=a%40b.c&name=Ana", None, None, 200, None),
    ("health", "GET", "", None, None, 200, None),
    ("wrong-key", "POST", None, FORM, b"a=1", 403, "key is missing or wrong"),
    ("no-key", "GET", "", None, None, 403, "key is missing or wrong"),
    ("put", "PUT", "", FORM, b"a=1", 405, "Method not allowed"),
    ("delete", "DELETE", "", None, None, 405, "Method not allowed"),
    ("text-plain", "POST", "", "text/plain", b"a=1", 415, "Unsupported Content-Type"),
    ("bad-charset", "POST", "", FORM + "; charset=klingon", b"a=1", 415, "charset"),
    ("json-not-object", "POST", "", "application/json", b"[1, 2]", 400, "must be an object"),
    ("json-invalid", "POST", "", "application/json", b"{nope", 400, "not valid JSON"),
    ("empty-body", "POST", "", FORM, b"", 400, "body is empty"),
    ("too-many-params", "POST", "", FORM, b"&".join(b"v%d=1" % i for i in range(1001)), 400, "max_params"),
    ("too-deep", "POST", "", FORM, b"a" + b"[x]" * 65 + b"=1", 400, "max_depth"),
    ("multipart-no-boundary", "POST", "", "multipart/form-data", b"x", 400, "boundary"),
]


@pytest.mark.parametrize("case", REQUESTS, ids=lambda c: c[0])
def test_request_table(site, case):
    name, method, query, content_type, body, status, error = case
    key = "wrong-key-000000000000" if query is None else SECRET
    if name == "no-key":
        key = None
    headers = {"Content-Type": content_type} if content_type else {}
    response = site.app.request(site.url(query or "", key=key), method=method, body=body or b"",
                                headers=headers, status=status, expect_errors=status >= 400)
    answer = response.json
    assert response.content_type == "application/json"
    assert int(response.headers["Content-Length"]) == len(response.body)
    if error:
        assert answer == {"ok": False, "error": answer["error"], "status": status}
        assert error in answer["error"]
        assert site.rows() == []
    else:
        assert answer["ok"] is True


def test_post_is_stored_with_its_tree_and_raw_body(site):
    body = vbout_body(7)
    answer = site.post(body).json
    assert answer == {"ok": True, "event_id": 1, "duplicate": False}
    (row,) = site.rows()
    assert row["transaction_id"] == "123456796"
    assert row["contact_email"] == "contact7@example.com"
    assert row["contact_id"] == "5007"
    assert row["raw_body"] == body
    assert row["method"] == "POST" and row["content_type"] == FORM
    assert row["remote_addr"] == "198.51.100.7"
    assert json.loads(row["payload"]) == listener.parse_form(body)
    assert json.loads(row["payload"])["fields"][0] == {"id": "100", "name": "First Name",
                                                       "value": "Value 0 for contact 7"}


def test_repeated_transactionid_is_stored_once(site):
    first = site.post(b"transactionid=42&contact[email]=a@b.c").json
    again = site.post(b"transactionid=42&contact[email]=changed@b.c").json
    assert first == {"ok": True, "event_id": 1, "duplicate": False}
    assert again == {"ok": True, "event_id": 1, "duplicate": True}
    assert [r["contact_email"] for r in site.rows()] == ["a@b.c"]


def test_get_event_without_key_in_tree_or_row(site):
    answer = site.app.get(site.url("email=a%40b.c&first=Ana&tags[]=x&tags[]=y"), status=200).json
    assert answer["event_id"] == 1
    (row,) = site.rows()
    assert json.loads(row["payload"]) == {"email": "a@b.c", "first": "Ana", "tags": ["x", "y"]}
    assert row["raw_body"] == b"email=a%40b.c&first=Ana&tags[]=x&tags[]=y"
    assert row["contact_email"] == "a@b.c"
    assert SECRET.encode() not in b"".join(str(v).encode() for v in row.values())


def test_get_repeated_within_window_is_a_duplicate(site):
    first = site.app.get(site.url("email=a%40b.c"), status=200).json
    again = site.app.get(site.url("email=a%40b.c"), status=200).json
    other = site.app.get(site.url("email=z%40b.c"), status=200).json
    assert again == {"ok": True, "event_id": first["event_id"], "duplicate": True}
    assert other["duplicate"] is False
    assert len(site.rows()) == 2


def test_get_repeated_after_window_is_stored_again(site):
    site.reconfigure(dedupe_window="0")
    site.app.get(site.url("email=a%40b.c"), status=200)
    assert site.app.get(site.url("email=a%40b.c"), status=200).json["duplicate"] is False
    assert len(site.rows()) == 2


def test_health_check_stores_nothing(site):
    answer = site.app.get(site.url(), status=200).json
    assert answer["ok"] is True and answer["status"] == "ready" and answer["database"] == "ok"
    head = site.app.head(site.url(), status=200)
    assert head.body == b""
    assert site.rows() == []


def test_key_in_header_is_accepted(site):
    site.app.post("/listener.py", b"a=1", headers={"Content-Type": FORM, "X-Listener-Key": SECRET}, status=200)
    site.app.post("/listener.py", b"a=1", headers={"Content-Type": FORM, "X-Listener-Key": "nope"}, status=403)


def test_any_of_several_secrets_is_accepted(site):
    site.reconfigure(secret="old-secret-0123456789, new-secret-0123456789")
    site.post(b"a=1", key="old-secret-0123456789")
    site.post(b"a=2", key="new-secret-0123456789")
    site.post(b"a=3", key="other-secret-012345678", status=403)
    assert len(site.rows()) == 2


def test_empty_secret_refuses_with_503(site):
    site.reconfigure(secret="")
    answer = site.post(b"a=1", status=503).json
    assert "[listener] secret" in answer["error"] and "init" in answer["error"]
    assert not __import__("os").path.exists(site.config.database)


def test_misconfigured_listener_answers_500_with_details_only_in_log(site):
    site.reconfigure(max_body_bytes="10k")
    errors = io.StringIO()
    environ = {"REQUEST_METHOD": "POST", "QUERY_STRING": "key=" + SECRET, "CONTENT_LENGTH": "3",
               "CONTENT_TYPE": FORM, "wsgi.input": io.BytesIO(b"a=1"), "wsgi.errors": errors,
               "VBOUT_LISTENER_CONFIG": site.config_path}
    status, _, body = call(environ)
    answer = json.loads(body)
    assert status.startswith("500")
    assert answer == {"ok": False, "error": "The listener is misconfigured; the details are in its log.",
                      "status": 500}
    assert "max_body_bytes" in errors.getvalue() and site.config_path in errors.getvalue()


def test_body_over_limit_by_content_length_is_refused_unread(site):
    site.reconfigure(max_body_bytes="2048")

    class Unreadable(io.BytesIO):
        def read(self, *args):
            raise AssertionError("the body must not be read")

    environ = {"REQUEST_METHOD": "POST", "QUERY_STRING": "key=" + SECRET, "CONTENT_LENGTH": "4096",
               "CONTENT_TYPE": FORM, "wsgi.input": Unreadable(), "VBOUT_LISTENER_CONFIG": site.config_path}
    status, _, body = call(environ)
    assert status.startswith("413") and "max_body_bytes" in json.loads(body)["error"]


def test_chunked_body_over_limit_stops_reading_at_the_limit(site):
    site.reconfigure(max_body_bytes="2048")
    stream = io.BytesIO(b"a=" + b"x" * 100000)
    environ = {"REQUEST_METHOD": "POST", "QUERY_STRING": "key=" + SECRET, "HTTP_TRANSFER_ENCODING": "chunked",
               "CONTENT_TYPE": FORM, "wsgi.input": stream, "VBOUT_LISTENER_CONFIG": site.config_path}
    status, _, _ = call(environ)
    assert status.startswith("413")
    assert stream.tell() <= 2049
    assert site.rows() == []


def test_chunked_body_within_limit_is_stored(site):
    environ = {"REQUEST_METHOD": "POST", "QUERY_STRING": "key=" + SECRET, "HTTP_TRANSFER_ENCODING": "chunked",
               "CONTENT_TYPE": FORM, "wsgi.input": io.BytesIO(b"a=1"), "VBOUT_LISTENER_CONFIG": site.config_path}
    status, _, body = call(environ)
    assert status.startswith("200") and json.loads(body)["event_id"] == 1


def test_post_without_length_is_411(site):
    environ = {"REQUEST_METHOD": "POST", "QUERY_STRING": "key=" + SECRET, "CONTENT_TYPE": FORM,
               "wsgi.input": io.BytesIO(b"a=1"), "VBOUT_LISTENER_CONFIG": site.config_path}
    status, _, body = call(environ)
    assert status.startswith("411") and json.loads(body)["status"] == 411


def test_body_over_limit_is_413(site):
    site.reconfigure(max_body_bytes="2048")
    assert "max_body_bytes" in site.post(b"a=" + b"x" * 3000, status=413).json["error"]


def test_allowed_ips_refuse_other_addresses(site):
    site.reconfigure(allowed_ips="203.0.113.0/24")
    site.post(b"a=1", status=403)
    site.post(b"a=1", extra_environ={"REMOTE_ADDR": "203.0.113.9"})


def test_forwarded_for_is_believed_only_from_trusted_proxies(site):
    site.reconfigure(allowed_ips="203.0.113.0/24", trusted_proxies="10.0.0.1")
    forwarded = {"X-Forwarded-For": "203.0.113.9"}
    site.app.post(site.url(), b"a=1", headers=dict(forwarded, **{"Content-Type": FORM}),
                  extra_environ={"REMOTE_ADDR": "10.0.0.1"}, status=200)
    site.app.post(site.url(), b"a=2", headers=dict(forwarded, **{"Content-Type": FORM}),
                  extra_environ={"REMOTE_ADDR": "10.0.0.2"}, status=403)
    assert site.rows()[0]["remote_addr"] == "203.0.113.9"


def test_internal_error_answers_500_without_traceback(site, monkeypatch):
    def boom(*args):
        raise RuntimeError("secret detail at /srv/private/path")
    monkeypatch.setattr(listener, "_event_row", boom)
    answer = site.post(b"a=1", status=500)
    assert "secret detail" not in answer.text and "Traceback" not in answer.text and "/srv" not in answer.text
    assert "Traceback" in site.log_text() and "RuntimeError" in site.log_text()


def test_log_has_one_line_per_request_without_key_or_values(site):
    site.post(b"transactionid=1&contact[email]=private%40example.com")
    site.post(b"a=1", key="wrong-key-000000000000", status=403)
    site.app.request(site.url(), method="PUT\nINJECTED", status=405, expect_errors=True)
    lines = site.log_text().splitlines()
    assert len(lines) == 3
    assert " POST 200 event=1 " in lines[0] and lines[0].endswith("ms")
    assert "[" in lines[0] and "]" in lines[0]  # a request id
    text = site.log_text()
    assert SECRET not in text and "private" not in text and "wrong-key" not in text
    assert "INJECTED" in lines[2] and "\\n" in lines[2]  # escaped, not a second line


def test_log_file_and_its_new_folder_are_private(site):
    site.reconfigure(log_file="logs/listener.log")
    site.post(b"transactionid=1")
    site.post(b"transactionid=2")
    folder = os.path.join(site.folder, "logs")
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(os.path.join(folder, "listener.log")).st_mode) == 0o600
    assert len(open(os.path.join(folder, "listener.log")).read().splitlines()) == 2


def test_key_never_stored_or_answered(site):
    response = site.post(vbout_body())
    assert SECRET not in response.text
    raw = open(site.config.database, "rb").read()
    assert SECRET.encode() not in raw


def test_application_passes_wsgiref_validate(site):
    app = wsgiref.validate.validator(listener.application)
    for method, body in (("POST", b"transactionid=9&a[b]=1"), ("GET", None), ("POST", b"x" * 10)):
        environ = {"REQUEST_METHOD": method, "QUERY_STRING": "key=" + SECRET, "SERVER_NAME": "localhost",
                   "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1", "SCRIPT_NAME": "", "PATH_INFO": "/",
                   "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(body or b""),
                   "wsgi.errors": io.StringIO(), "wsgi.multithread": False, "wsgi.multiprocess": False,
                   "wsgi.run_once": False, "VBOUT_LISTENER_CONFIG": site.config_path}
        if body is not None:
            environ.update(CONTENT_LENGTH=str(len(body)), CONTENT_TYPE=FORM)
        seen = []
        result = app(environ, lambda status, headers, exc_info=None: seen.append(status))
        b"".join(result)
        result.close()
        assert seen[0].startswith("200")


def test_config_file_is_chosen_per_request(site, tmp_path_factory):
    from conftest import Site
    other = Site(tmp_path_factory.mktemp("other"))
    site.post(b"a=1")
    site.post(b"a=2", extra_environ={"VBOUT_LISTENER_CONFIG": other.config_path})
    assert len(site.rows()) == 1 and len(other.rows()) == 1
