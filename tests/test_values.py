"""Scalar rules shared by every parser: durations, RE2 regexes, IPs, header names, label selectors."""

from __future__ import annotations

import pytest

from canal.model.base import FieldError, Issues, Node
from canal.model.values import (
    MAX_REGEX_PROGRAM_SIZE,
    check_header_name,
    check_ip,
    check_regex,
    format_duration_ms,
    parse_duration_ms,
    parse_label_selector,
)


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("10s", 10_000),
        ("250ms", 250),
        ("1.5s", 1_500),
        ("1h30m", 5_400_000),
        ("2m0.5s", 120_500),
        ("0", 0),
        ("1000us", 1),
        ("0.001s", 1),
        (".5s", 500),
    ],
)
def test_durations_in_go_and_protobuf_syntax(text, ms):
    assert parse_duration_ms(text, "f", minimum_ms=0) == ms


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("10 seconds", "is not a duration"),
        ("-1s", "negative"),
        ("5", "is not a duration"),
        ("1.5ms", "millisecond precision"),
        ("s", "is not a duration"),
        ("", "is not a duration"),
        ("10x", "is not a duration"),
        ("500us", "millisecond precision"),
    ],
)
def test_malformed_durations_are_rejected(text, reason):
    with pytest.raises(FieldError, match=reason):
        parse_duration_ms(text, "spec.timeout")


def test_duration_minimum_and_formatting():
    with pytest.raises(FieldError, match="at least 1ms"):
        parse_duration_ms("0s", "f")
    assert [format_duration_ms(v) for v in (1500, 120_000, 5, 0)] == ["1.5s", "120s", "0.005s", "0s"]


@pytest.mark.parametrize("pattern", ["(?=x)", "a(?!b)", "(?<=a)b", r"\1", "(a", "a{1001}"])
def test_regexes_envoy_would_reject(pattern):
    with pytest.raises(FieldError, match="invalid RE2 regex"):
        check_regex(pattern, "f")


def test_regex_program_size_limit_matches_envoy():
    check_regex("/api/v[0-9]+/(users|orders)/[^/]+", "f")
    with pytest.raises(FieldError, match=f"exceeds Envoy's limit of {MAX_REGEX_PROGRAM_SIZE}"):
        check_regex("(?:abcdefghij){1000}" * 4, "f")  # RE2 program size ~40,000


def test_ips_and_header_names():
    assert check_ip("fd00:0::1", "f") == "fd00::1"
    with pytest.raises(FieldError, match="not a valid IPv4 or IPv6"):
        check_ip("10.0.0.256", "f")
    assert check_header_name("X-User", "f") == "x-user"
    assert check_header_name(":authority", "f", allow_pseudo=True) == ":authority"
    for bad in ("x user", "x:y", "", "é"):
        with pytest.raises(FieldError, match="not a valid HTTP header name"):
            check_header_name(bad, "f")


def test_label_selector_semantics():
    issues = Issues()
    selector = parse_label_selector(
        Node(
            {
                "matchLabels": {"team": "a"},
                "matchExpressions": [{"key": "env", "operator": "NotIn", "values": ["dev"]}],
            },
            "spec.namespaceSelector",
            issues,
        )
    )
    assert selector.matches({"team": "a", "env": "prod"})
    assert selector.matches({"team": "a"})  # NotIn matches a missing key, as in Kubernetes
    assert not selector.matches({"team": "a", "env": "dev"})
    assert not selector.matches({"team": "b"})
    assert parse_label_selector(Node({}, "s", issues)).matches({})  # the empty selector selects everything
    with pytest.raises(FieldError, match="must not be empty for operator In"):
        parse_label_selector(Node({"matchExpressions": [{"key": "a", "operator": "In"}]}, "s", issues))
