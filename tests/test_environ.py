"""Unit tests of environs kept as JSON text: what they accept and what they write must be what the
standard library's ``json`` (which upstream reads them with) accepts and reads."""

from __future__ import annotations

import json
import math
import random
from typing import Any

import pytest

from consumer import environ
from consumer.decode import decode
from consumer.environ import RawEnviron
from consumer.errors import UndecodableMessage


def stdlib(body: bytes) -> Any:
    """What upstream's receiver made of a body: ``json.loads`` of its UTF-8 text."""
    return json.loads(body.decode("utf-8"))


def same(a: Any, b: Any) -> bool:
    """Equal, with NaN equal to NaN and 0.0 told from -0.0 (what json.dumps writes apart)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def outcome(parse: Any, body: bytes) -> tuple[str, Any]:
    try:
        value = parse(body)
    except RecursionError:
        return "refused", None
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return "refused", None
    if isinstance(value, RawEnviron):
        value = value.to_dict()
    return "taken", value


def assert_as_stdlib(body: bytes) -> None:
    expected, value = outcome(stdlib, body)
    got, parsed = outcome(environ.parse, body)
    assert got == expected, body[:200]
    if expected == "taken":
        assert same(parsed, value), body[:200]
        if isinstance(value, dict):
            written = environ.environ_json(environ.parse(body))
            assert same(stdlib(written), value), body[:200]


EDGE_CASES = [
    b'{"a": 1}',
    b"{}",
    b' \n\t{ "a" :\t[1, 2 ] ,"b":{}}\r\n',
    b'{"a": NaN, "b": [Infinity, -Infinity]}',
    b'{"a": {"deep": [NaN]}}',
    b'{"a": "\\ud800"}',
    b'{"a": {"b": "\\udfff x"}}',
    b'{"a": "\\ud83d\\ude00"}',
    b'{"a": "\xf0\x9f\x98\x80 \xc5\xbc\xc3\xb3\xc5\x82w"}',
    b'{"a": {"b": "\xff"}}',
    b'{"a": {"b": "\xc3"}}',
    b'{"\xc3\xa9\\n\\u0000": 1}',
    b'{"a": 1, "a": {"x": 2}, "b": 3, "a": [4]}',
    b'{"a": 123456789012345678901234567890, "b": -1e400, "c": 1e-400, "d": -0.0}',
    b'{"a": 1E5, "b": 2.5e-3, "c": 0.1, "d": 1.7976931348623157e308}',
    b'{"a": "x\x01y"}',
    b'{"a": {"b": "x\x1f"}}',
    b'{"a": {"b": 01}}',
    b'{"a": [1,]}',
    b'{"a": {"b": "\\q"}}',
    b'{"a": {"b": "\\u12"}}',
    b'{"a": {"b": .5}}',
    b'{"a": {"b": +1}}',
    b'{"a": {"b": 0x10}}',
    b'{"a": 1} x',
    b'{"a": 1}{}',
    b"\xef\xbb\xbf{}",
    b"[1, 2]",
    b'"text"',
    b"null",
    b"",
    b"   ",
    b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    b'{"a": "' + b"\\\\" * 1000 + b'"}',
    b'{"a": "tab\\there", "b": "\\"quoted\\"", "c": "\\/"}',
]


@pytest.mark.parametrize("body", EDGE_CASES)
def test_a_body_is_taken_or_refused_as_json_loads_takes_or_refuses_it(body):
    assert_as_stdlib(body)


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    kinds = ["int", "float", "str", "bool", "null"] + (["list", "dict"] * 2 if depth < 4 else [])
    kind = rng.choice(kinds)
    if kind == "int":
        return rng.choice([0, -1, rng.randrange(-(2**70), 2**70), rng.randrange(-1000, 1000)])
    if kind == "float":
        return rng.choice(
            [rng.uniform(-1e6, 1e6), rng.random() * 10 ** rng.randrange(-320, 308), -0.0, 0.1]
        )
    if kind == "str":
        alphabet = 'ab "\\/\n\t\x00\x1fé€😀\u2028'
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "list":
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(0, 5))]
    return {
        _random_value(rng, 99) if rng.random() < 0.9 else "dup": _random_value(rng, depth + 1)
        for _ in range(rng.randrange(0, 5))
    }


def test_random_environs_and_their_corruptions_are_read_as_json_loads_reads_them():
    rng = random.Random(20261202)
    for _ in range(3000):
        env = {f"k{i}": _random_value(rng) for i in range(rng.randrange(0, 6))}
        body = json.dumps(
            env,
            ensure_ascii=rng.random() < 0.5,
            indent=rng.choice([None, 0, 2, "\t"]),
            separators=rng.choice([None, (",", ":"), (" , ", " : ")]),
        ).encode("utf-8")
        assert_as_stdlib(body)
        # and the same body with one byte changed, cut short, or grown
        data = bytearray(body)
        if data:
            i = rng.randrange(len(data))
            data[i] = rng.choice(b'{}[]",:\\0e.-+ tnufalsNI\xff\xc3\x80')
            assert_as_stdlib(bytes(data))
            assert_as_stdlib(bytes(data[: rng.randrange(len(data))]))
        assert_as_stdlib(body + rng.choice([b" ", b"\n", b"}", b"x", b", 1"]))


def test_numbers_are_read_to_the_same_float_as_json_loads_reads_them():
    rng = random.Random(7)
    texts = [repr(rng.uniform(-1e3, 1e3)) for _ in range(2000)]
    texts += [
        f"{rng.random() * 10:.{rng.randrange(1, 25)}f}e{rng.randrange(-330, 330)}"
        for _ in range(2000)
    ]
    texts += ["1e309", "-1e309", "4.9e-324", "2.2250738585072014e-308", "9007199254740993"]
    for text in texts:
        expected = json.loads(text)
        got = environ.loads(text.encode())
        assert type(got) is type(expected) and (
            got == expected or (math.isinf(got) and math.isinf(expected))
        ), text


def test_a_raw_environ_decodes_a_field_when_it_is_read_and_never_what_is_thrown_away():
    env = environ.parse(b'{"job_id": "j", "workers_jobs": {"x": [1, 2]}, "n": 1e400}')
    assert isinstance(env, RawEnviron)
    assert env["job_id"] == "j" and env.get("missing") is None and "workers_jobs" in env
    assert env["n"] == math.inf  # beyond msgspec's numbers: read as json.loads reads it
    del env["workers_jobs"]
    assert list(env) == ["job_id", "n"] and len(env) == 2
    assert env.to_json() == b'{"job_id":"j","n":1e400}'


def test_what_is_assigned_to_a_raw_environ_is_written_as_json_dumps_writes_it():
    env = environ.parse(b'{"a": [1]}')
    assert isinstance(env, RawEnviron)
    env["nan"] = math.nan
    env["text"] = "é\n"
    env["a"] = {"b": (1, 2)}
    copy = env.copy()
    del copy["a"]
    assert "a" in env and "a" not in copy
    written = env.to_json()
    assert b"NaN" in written and b"\\u00e9\\n" in written
    assert same(json.loads(written), {"a": {"b": [1, 2]}, "nan": math.nan, "text": "é\n"})
    with pytest.raises(TypeError):
        env["when"] = object()


def test_a_raw_environ_reads_a_value_afresh_each_time():
    env = environ.parse(b'{"results": {"a": 1}}')
    env["results"]["a"] = 2  # changes the copy read, not the environ
    assert env["results"] == {"a": 1}


def test_decode_keeps_the_legacy_rules_on_raw_environs():
    result = decode(b'{"error": {}, "workers_jobs": {"j": 1}, "workers_jobs.extra_args": {}}', "m")
    assert isinstance(result.env, RawEnviron)
    assert set(result.env) == {"error"}
    # A body only json.loads takes is a plain dict, with the same rules
    result = decode(b'{"error": NaN, "workers_jobs": {}}')
    assert type(result.env) is dict and set(result.env) == {"error"}
    with pytest.raises(UndecodableMessage, match="not UTF-8"):
        decode(b'{"error": {"message": "\xff"}}')
