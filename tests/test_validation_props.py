"""Properties of the validators every request goes through (hypothesis, no server).

Whatever a client sends, a validator either accepts it or answers
`bad_request`; it never raises anything else (which would be a 500 or a
dropped connection), and the glob grants of the `channels` claim never match
more than they say.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.protocol.channels import claim_allows, validate_channel
from gateway.protocol.errors import ProtocolError
from gateway.protocol.wire import decode_request, json_depth_ok

NAME_CHARS = st.sampled_from("abcXYZ019_-.@=:")
channel_names = st.text(NAME_CHARS, min_size=1, max_size=40)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner,
                                                                  max_size=3),
    max_leaves=30,
)


@given(st.one_of(st.text(max_size=300), st.text(NAME_CHARS, min_size=250, max_size=260),
                 st.integers(), st.none(), st.lists(st.text())))
@example("job:\ud800")  # a lone surrogate: not even encodable
@example("x:" + "a" * 254)  # 256 bytes
def test_validate_channel_accepts_or_says_bad_request(value: Any):
    try:
        name = validate_channel(value)
    except ProtocolError as exc:
        assert exc.code == "bad_request"
        return
    assert isinstance(name, str) and len(name.encode()) <= 255
    assert re.fullmatch(r"[A-Za-z0-9_\-:.@=]+", name)
    namespace, _, rest = name.partition(":")
    assert namespace and rest


@given(channel_names, channel_names)
def test_exact_grant_matches_only_itself(grant: str, channel: str):
    assert claim_allows([grant.replace("*", "")], channel) == (grant.replace("*", "") == channel)


@given(channel_names, channel_names)
def test_prefix_glob_matches_exactly_the_prefix(prefix: str, channel: str):
    prefix = prefix.replace("*", "")
    assert claim_allows([prefix + "*"], channel) == channel.startswith(prefix)


@given(json_values)
def test_depth_check_agrees_with_a_recursive_count(value: Any):
    def depth(v: Any) -> int:
        if isinstance(v, dict):
            return 1 + max((depth(x) for x in v.values()), default=0)
        if isinstance(v, list):
            return 1 + max((depth(x) for x in v), default=0)
        return 0

    for limit in (1, 2, 3, 5):
        assert json_depth_ok(value, limit) == (depth(value) <= limit)


@settings(max_examples=200)
@given(st.one_of(st.binary(max_size=64), st.text(max_size=64),
                 json_values.map(lambda v: orjson.dumps(v).decode())))
def test_decode_request_accepts_objects_or_says_bad_request(raw: str | bytes):
    try:
        obj = decode_request(raw, 4)
    except ProtocolError as exc:
        assert exc.code == "bad_request"
        return
    assert isinstance(raw, str) and isinstance(obj, dict)
