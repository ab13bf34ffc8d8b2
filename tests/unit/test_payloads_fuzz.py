"""Property-based fuzzing of the parsers: whatever arrives, the answer is a payload or
exactly one :class:`PayloadError`, never another exception (which the entry points
would report as an internal error and leave the file in the cache for ever).

Budgets are bounded and derandomized so CI runs the same examples every time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers.store import drop, update_config
from vr.cloudstack import CFG_HEADER, FILE_TYPES, parse_cfg
from vr.errors import PayloadError
from vr.paths import Paths
from vr.payloads import PayloadLimits, parse_payload

FUZZ = settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
SMALL = PayloadLimits(userdata_bytes=4096, value_bytes=4096, keys_per_vm=16, payload_bytes=1 << 20)

NAMES = st.sampled_from([f"{stem}.json.f" for stem in FILE_TYPES] + ["x.json", "VR-1.cfg"])
FIELDS = [
    "type", "vm_ip_address", "vm_metadata", "ip_address", "password", "device",
    "router_guest_ip", "cidr", "add", "mac_address", "router_guest_gateway",
    "ipv4_address", "host_name", "remove", "default_entry",
]  # fmt: skip
PLAUSIBLE = [
    "vmdata", "vmpassword", "guestnetwork", "dhcpentry", "10.1.1.23", "10.1.1.0/24",
    "10.1.1.1", "0.0.0.0/0", "169.254.169.254", "ff:ff:ff:ff:ff:ff", "02:00:0a:01:01:17",
    "eth0", "lo", "metadata", "userdata", "user-data", "vm-id", "", "true", "false",
    "I2Nsb3VkLWNvbmZpZwo=", "Pw\u2028x", "Pw\x85x", "../x",
]  # fmt: skip


def _scalar_text() -> st.SearchStrategy[str]:
    """JSON scalars as text, including what json.loads accepts but we refuse."""
    return st.one_of(
        st.sampled_from(["null", "true", "false", "NaN", "-Infinity", "1e999", "-0"]),
        st.integers().map(str),
        st.floats(allow_nan=False, allow_infinity=False).map(repr),
        # around Python's 4,300-digit int conversion limit
        st.integers(min_value=4290, max_value=4400).map(lambda n: "9" * n),
        st.sampled_from(PLAUSIBLE).map(json.dumps),
        st.text(max_size=20).map(json.dumps),
        st.just('"\\ud800"'),
    )


def _json_text() -> st.SearchStrategy[str]:
    keys = st.sampled_from([*FIELDS, "x"]).map(json.dumps)
    return st.recursive(
        _scalar_text(),
        lambda inner: st.one_of(
            st.lists(inner, max_size=5).map(lambda xs: "[" + ",".join(xs) + "]"),
            # keys from a small set: duplicates come up often
            st.lists(st.tuples(keys, inner), max_size=6).map(
                lambda kvs: "{" + ",".join(f"{k}:{v}" for k, v in kvs) + "}"
            ),
        ),
        max_leaves=25,
    )


def _shaped_payload() -> st.SearchStrategy[dict[str, Any]]:
    """Objects with the real field names and wrong, odd or right values."""
    value: st.SearchStrategy[Any] = st.one_of(
        st.sampled_from(PLAUSIBLE),
        st.none(),
        st.booleans(),
        st.integers(),
        st.text(max_size=12),
        st.lists(
            st.lists(st.one_of(st.sampled_from(PLAUSIBLE), st.none(), st.integers()), max_size=4),
            max_size=4,
        ),
    )
    return st.dictionaries(st.sampled_from(FIELDS), value, max_size=len(FIELDS))


def _parses_or_refuses(name: str, data: bytes) -> None:
    try:
        parse_payload(name, data, SMALL)
    except PayloadError as exc:
        assert str(exc) and "\n" not in str(exc)


@FUZZ
@given(name=NAMES, data=st.binary(max_size=512))
def test_any_bytes_are_a_payload_or_one_payload_error(name: str, data: bytes) -> None:
    _parses_or_refuses(name, data)


@FUZZ
@given(name=NAMES, text=_json_text())
def test_any_json_text_is_a_payload_or_one_payload_error(name: str, text: str) -> None:
    _parses_or_refuses(name, text.encode("utf-8", "surrogatepass"))


@FUZZ
@given(name=NAMES, obj=_shaped_payload())
def test_any_payload_shaped_object_is_a_payload_or_one_payload_error(
    name: str, obj: dict[str, Any]
) -> None:
    _parses_or_refuses(name, json.dumps(obj).encode())


CFG_LINES = [
    "<version>", "1.0", "</version>", "<file>", "</file>", "<script>", "</script>",
    "/var/cache/cloud/vm_metadata.json.a", "/var/cache/cloud/vm_password.json.b",
    "/var/cache/cloud/../etc", "/opt/cloud/bin/update_config.py vm_metadata.json.a",
    "/opt/cloud/bin/update_config.py vm_password.json.b false",
    "/opt/cloud/bin/update_config.py vm_metadata.json.a maybe", "update_config.py",
    '{"vm_ip_address":"10.1.1.2","vm_metadata":[["metadata","a","b"]]}',
    '{"ip_address":"10.1.1.2","password":"Pw-1"}', "#comment", "", " ",
]  # fmt: skip


def _cfg_text() -> st.SearchStrategy[str]:
    line = st.one_of(st.sampled_from(CFG_LINES), st.text(max_size=30))
    return st.lists(line, max_size=30).map(
        lambda lines: CFG_HEADER + "\n" + "\n".join(lines) + "\n"
    )


def _batch_refused_or_parsed(text: str) -> None:
    try:
        batch = parse_cfg(text)
    except PayloadError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    for item in batch.items:
        _parses_or_refuses(item.name, item.data)


@FUZZ
@given(text=st.text(max_size=300))
def test_any_text_is_a_cfg_batch_or_one_payload_error(text: str) -> None:
    _batch_refused_or_parsed(text)


@FUZZ
@given(text=_cfg_text())
def test_any_cfg_shaped_text_is_a_cfg_batch_or_one_payload_error(text: str) -> None:
    _batch_refused_or_parsed(text)


@settings(FUZZ, max_examples=200)
@given(name=NAMES, text=_json_text())
def test_update_config_answers_any_push_with_one_line_and_never_an_internal_error(
    tmp_path_factory: Any, name: str, text: str
) -> None:
    """Through the entry point: exit 0 or 1, one stderr line, the file out of the cache
    (applied and archived, or moved to failed/), so a retry cannot fail the same way."""
    paths = Paths(Path(tmp_path_factory.mktemp("fuzz")))
    paths.ensure()
    drop(paths, name, text.encode("utf-8", "surrogatepass"))

    run = update_config(paths, name)

    assert run.code in (0, 1)
    assert len(run.err.splitlines()) == 1, run.err
    assert "internal error" not in run.err
    assert not (paths.cache / name).exists()
