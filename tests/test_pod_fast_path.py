"""Pods take a direct parsing path for speed; it must agree exactly with the checked path, or step aside."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from canal.model.base import FieldError, Issues
from canal.model.kube import _pod_checked, _pod_fast

ips = st.sampled_from(["10.244.1.1", "10.244.1.2", "fd00::1", "fd00:0::2", "010.1.1.1", "1.2.3.256", "", 7, None])
label_values = st.one_of(st.sampled_from(["web", "v1", ""]), st.integers(0, 3), st.booleans())
timestamps = st.sampled_from(
    ["2024-01-01T00:00:00Z", "2024-03-01T09:00:00+09:00", "2024-01-01T00:00:00.5Z", "yesterday", 5, None]
)


@st.composite
def pods(draw):
    metadata = {"name": draw(st.sampled_from(["p", "", 3])), "namespace": draw(st.sampled_from(["default", "a", None]))}
    for key, value in (
        ("labels", st.dictionaries(st.sampled_from(["app", "version"]), label_values, max_size=2)),
        ("creationTimestamp", timestamps),
        ("generation", st.sampled_from([0, 3, -1, "2", True])),
        ("uid", st.sampled_from(["u-1", 5])),
        ("deletionTimestamp", st.sampled_from(["2024-01-01T00:00:00Z"])),
    ):
        if draw(st.booleans()):
            metadata[key] = draw(value)
    listed = draw(st.lists(ips, max_size=2))
    status = {
        "phase": draw(st.sampled_from(["Running", "Pending", None])),
        "podIPs": [{"ip": ip} for ip in listed],
        "conditions": draw(
            st.lists(
                st.fixed_dictionaries(
                    {"type": st.sampled_from(["Ready", "Other"]), "status": st.sampled_from(["True", "False"])}
                ),
                max_size=2,
            )
        ),
    }
    if draw(st.booleans()):
        status["podIP"] = draw(ips)
    obj = {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "status": status}
    if draw(st.booleans()):
        obj["spec"] = {"nodeName": draw(st.sampled_from(["node-1", 4]))}
    return obj


@settings(max_examples=1500, deadline=None)
@given(pods())
def test_fast_path_matches_the_checked_path(obj):
    try:
        fast = _pod_fast(obj)
    except (AttributeError, KeyError, TypeError, ValueError, OSError):
        fast = None  # parse_pod falls back, exactly like this
    try:
        checked = _pod_checked(obj, Issues())
    except FieldError:
        checked = None
    if fast is not None:
        assert fast == checked


def test_the_fast_path_is_taken_for_ordinary_pods():
    obj = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "p",
            "namespace": "a",
            "labels": {"app": "web"},
            "creationTimestamp": "2024-01-01T00:00:00Z",
        },
        "spec": {"nodeName": "n1"},
        "status": {
            "phase": "Running",
            "podIP": "10.0.0.1",
            "podIPs": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}],
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }
    fast = _pod_fast(obj)
    assert fast is not None and fast == _pod_checked(obj, Issues())
    assert fast.ips == ("10.0.0.1", "fd00::1") and fast.ready
