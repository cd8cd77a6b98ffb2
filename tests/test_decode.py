"""Unit tests of decoding: the legacy receiver's rules, without assert."""

import json

import pytest

from consumer.decode import content_key, decode
from consumer.errors import InvalidEnviron, UndecodableMessage
from tests.conftest import load_fixture


def test_captured_sioworkersd_environ_decodes_and_loses_the_sent_jobs():
    body = json.dumps(load_fixture("sioworkersd_ping_env.json")).encode()
    result = decode(body, "GROUP_x")
    assert "workers_jobs" not in result.env
    assert set(result.env["workers_jobs.results"]) == {"job0", "job1"}
    assert result.key == "GROUP_x"


def test_error_environ_without_results_is_valid():
    body = json.dumps(load_fixture("validation_error_env.json")).encode()
    result = decode(body)
    assert result.env["error"]["message"].startswith("One of the tasks requires")
    assert result.key == content_key(body)


def test_extra_args_are_dropped():
    result = decode(b'{"error": {}, "workers_jobs.extra_args": {"a": 1}}')
    assert "workers_jobs.extra_args" not in result.env


@pytest.mark.parametrize(
    ("body", "error", "text"),
    [
        (b"\xff\xfe", UndecodableMessage, "not UTF-8"),
        (b"not json", UndecodableMessage, "not JSON"),
        (b"", UndecodableMessage, "not JSON"),
        (b"[1, 2]", InvalidEnviron, "JSON object, not list"),
        (b'"text"', InvalidEnviron, "not str"),
        (b'{"workers_jobs": {}}', InvalidEnviron, "neither"),
    ],
)
def test_bad_bodies_raise_permanent_errors_with_reasons(body, error, text):
    with pytest.raises(error, match=text):
        decode(body)


def test_message_without_id_is_keyed_by_content():
    assert decode(b'{"error": 1}').key == decode(b'{"error": 1}').key
    assert decode(b'{"error": 1}').key != decode(b'{"error": 2}').key
