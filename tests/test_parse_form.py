"""parse_form against PHP's own parse_str: committed fixtures, a live regeneration, random bodies."""

import base64
import json
import os
import random
import subprocess

import pytest

import listener
from conftest import PHP, ROOT, needs_php

FIXTURES = os.path.join(ROOT, "tests", "fixtures", "parse_str.json")
GENERATOR = os.path.join(ROOT, "tests", "php", "parse_str_fixtures.php")

with open(FIXTURES) as f:
    CASES = json.load(f)["cases"]


def php_names(tree):
    """Our top level with PHP's name mangling applied (' ', '.' and an unclosed '[' become '_')."""
    out = {}
    for key, value in tree.items():
        mangled = key.replace(" ", "_").replace(".", "_").replace("[", "_")
        assert mangled not in out, "fixture names must not collide once mangled"
        out[mangled] = value
    return out


def same(ours, php):
    """Equal as JSON, keys in the same order."""
    return json.dumps(php_names(ours)) == json.dumps(php)


@pytest.mark.parametrize("case", [c for c in CASES if not c["limit"]], ids=lambda c: c["id"])
def test_parse_form_matches_php_fixture(case):
    body = base64.b64decode(case["body_b64"])
    assert json.dumps(php_names(listener.parse_form(body))) == json.dumps(case["php"])


@pytest.mark.parametrize("case", [c for c in CASES if c["limit"]], ids=lambda c: c["id"])
def test_parse_form_refuses_what_php_drops(case):
    body = base64.b64decode(case["body_b64"])
    with pytest.raises(listener.LimitExceeded):
        listener.parse_form(body)
    # PHP itself kept less than was sent: silently losing data is what we refuse to do.
    sent = {t.split(b"=")[0].split(b"[")[0] for t in body.split(b"&") if t}
    assert len(case["php"]) < len(sent)


@needs_php
def test_parse_form_fixtures_are_what_php_generates():
    fresh = json.loads(subprocess.check_output([PHP, GENERATOR]))
    with open(FIXTURES) as f:
        committed = json.load(f)
    assert [c["id"] for c in fresh["cases"]] == [c["id"] for c in committed["cases"]]
    for new, old in zip(fresh["cases"], committed["cases"]):
        assert new == old, "regenerate with: php tests/php/parse_str_fixtures.php > tests/fixtures/parse_str.json"


def test_parse_form_keeps_top_level_names_unmangled():
    assert listener.parse_form(b"a.b=1&c+d=2&e[f=3") == {"a.b": "1", "c d": "2", "e[f": "3"}


def test_parse_form_top_level_is_always_a_dict():
    assert listener.parse_form(b"0=a&1=b") == {"0": "a", "1": "b"}


def test_parse_form_over_max_params_names_the_limit():
    body = b"&".join(b"v%d=1" % i for i in range(11))
    assert len(listener.parse_form(body, max_params=11)) == 11
    with pytest.raises(listener.LimitExceeded, match="max_params"):
        listener.parse_form(body, max_params=10)


def test_parse_form_over_max_depth_names_the_limit():
    assert listener.parse_form(b"a[1][2][3]=x", max_depth=3) == {"a": {"1": {"2": {"3": "x"}}}}
    with pytest.raises(listener.LimitExceeded, match="max_depth"):
        listener.parse_form(b"a[1][2][3][4]=x", max_depth=3)
    with pytest.raises(listener.LimitExceeded, match="max_depth"):  # the fast path's cached prefixes too
        listener.parse_form(b"a[1][2][3]=x&a[1][2][3][4]=y", max_depth=3)


def test_parse_form_exact_path_agrees_with_fast_path():
    fast = b"a%5Bb%5D=%C3%A9+x&c[]=1&c[]=2&d=e%3Df"
    assert listener._decode_whole(fast, listener._free_bytes(fast)) is not None
    slow = fast + b"&z=%zz"  # an invalid escape sends the whole body down the exact path
    assert listener._decode_whole(slow, listener._free_bytes(slow)) is None
    expected = dict(listener.parse_form(fast), z="%zz")
    assert listener.parse_form(slow) == expected


def test_parse_form_honours_a_single_byte_charset():
    assert listener.parse_form(b"name=Andr%E9", charset="iso-8859-1") == {"name": "Andr\u00e9"}
    assert listener.parse_form(b"name=Andr%E9") == {"name": "Andr\ufffd"}  # not UTF-8: replaced, no crash


def test_parse_form_honours_a_multibyte_charset():
    body = "name=" + "".join("%%%02X" % b for b in "東京".encode("shift_jis"))
    assert not listener._whole_decode_ok("shift_jis")  # decoded field by field
    assert listener.parse_form(body.encode(), charset="shift_jis") == {"name": "東京"}


def test_parse_form_accepts_str():
    assert listener.parse_form("a[b]=1") == {"a": {"b": "1"}}


ALPHABET = ["a", "b", "x", "0", "1", "2", "-", "[", "]", "[]", "[ ]", "[0]", "[1]", "[a]", "[-1]",
            " ", ".", "%5B", "%5D", "%20", "+", "%00", "%zz", "="]


def random_name(rng):
    return "".join(rng.choice(ALPHABET[:-1]) for _ in range(rng.randint(1, 7)))


def random_body(rng):
    tokens = []
    for _ in range(rng.randint(1, 8)):
        name = rng.choice(["a", "b", "a[x]", "a[]", "a[0]", "b[1][2]"]) if rng.random() < 0.4 else random_name(rng)
        value = rng.choice(["1", "2", "v", "", "%41", "x=y", "%"])
        tokens.append(name + ("=" + value if rng.random() < 0.9 else ""))
    return "&".join(tokens).encode("latin-1")


@needs_php
def test_parse_form_matches_php_on_random_bodies():
    rng = random.Random(20261126)
    bodies = [random_body(rng) for _ in range(800)]
    script = ('$out = []; foreach (json_decode(stream_get_contents(STDIN)) as $b) {'
              ' parse_str(base64_decode($b), $r); $out[] = (object)$r; }'
              ' echo json_encode($out, JSON_INVALID_UTF8_SUBSTITUTE);')
    given = json.dumps([base64.b64encode(b).decode() for b in bodies])
    php = json.loads(subprocess.run([PHP, "-r", script], input=given.encode(), stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, check=True).stdout)
    compared = 0
    for body, expected in zip(bodies, php):
        ours = listener.parse_form(body)
        mangled = [k.replace(" ", "_").replace(".", "_").replace("[", "_") for k in ours]
        if len(set(mangled)) < len(mangled):
            continue  # two of our names are one name to PHP: not comparable
        assert json.dumps(php_names(ours)) == json.dumps(expected), body
        compared += 1
    assert compared > 600


def test_parse_form_leaves_the_garbage_collector_as_it_found_it():
    import gc
    large = b"&".join(b"f[%d][name]=x" % i for i in range(8000))
    assert len(large) >= 65536  # big enough for the collector to be paused while it is parsed
    try:
        for enabled in (True, False):
            (gc.enable if enabled else gc.disable)()
            assert len(listener.parse_form(large, max_params=10000)["f"]) == 8000
            assert gc.isenabled() is enabled
            with pytest.raises(listener.LimitExceeded):
                listener.parse_form(large, max_params=10000, max_depth=1)
            assert gc.isenabled() is enabled
    finally:
        gc.enable()


def test_parse_form_memos_do_not_keep_a_large_bodys_keys():
    listener.parse_form(b"&".join(b"f[%d][name]=x" % i for i in range(3000)), max_params=5000)
    # kept, they would pin the memory of a big request
    assert len(listener._KINDS) <= listener._MEMO_SIZE and len(listener._NAMES) <= listener._MEMO_SIZE
    listener.parse_form(b"fields[0][name]=a&fields[1][name]=b")
    assert {"1", "name"} <= set(listener._KINDS)  # a typical call's keys and names are remembered
    assert listener._NAMES["fields[1][name]"] == ("fields[1]", "name", listener._STR)
    assert listener.parse_form(b"fields[0][name]=c&fields[1][name]=d") == {
        "fields": [{"name": "c"}, {"name": "d"}]}
