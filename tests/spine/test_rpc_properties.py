"""Property-based tests of every RPC of both daemons: whatever the request, never UNKNOWN or INTERNAL.

For each method of cvm.v1.GuestAgent and cvm.v1.HostDaemon, hypothesis builds request
messages from strategies over the method's protobuf fields (every scalar type across its
whole range, NaN and infinities, text of any Unicode, maps and repeated fields, nested
messages) and, separately, arbitrary bytes; each is sent to the daemon running as its own
process (:mod:`tests.spine.hostile`). The property: the answer's status is never UNKNOWN
or INTERNAL (those mean the server failed, not the caller), and the server's log shows no
traceback or error. Small enough for CI: a few dozen examples per method.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.spine.hostile import (
    AGENT_SERVICE,
    FORBIDDEN,
    HOST_SERVICE,
    HOSTILE_TEXT,
    Server,
    agent_server,
    call_raw,
    hostd_server,
    int_range,
    problems_in_log,
)

EXAMPLES = 50
TIMEOUT = 10.0
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def scalar_strategy(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return st.text(max_size=300) | st.sampled_from(HOSTILE_TEXT)
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=300)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_DOUBLE:
        return st.floats()
    if kind == FieldDescriptor.TYPE_FLOAT:
        return st.floats(width=32)
    if kind == FieldDescriptor.TYPE_ENUM:
        return st.integers(-(2**31), 2**31 - 1)  # proto3 enums are open: any int32 travels
    low, high = int_range(field)
    return st.integers(low, high)


def field_strategy(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    child = field.message_type
    if child is not None and child.GetOptions().map_entry:
        key, value = child.fields
        return st.dictionaries(scalar_strategy(key), scalar_strategy(value), max_size=20)
    if child is not None:
        single = message_strategy(child, depth + 1) if depth < 2 else st.just(None)
        return st.lists(single, max_size=3) if field.is_repeated else single
    if field.is_repeated:
        return st.lists(scalar_strategy(field), max_size=10)
    return scalar_strategy(field)


def message_strategy(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Messages of ``descriptor``, each field unset or drawn from its strategy."""
    fields = {field.name: st.none() | field_strategy(field, depth) for field in descriptor.fields}

    def build(values: dict[str, Any]) -> Message:
        message = message_factory.GetMessageClass(descriptor)()
        for field in descriptor.fields:
            value = values[field.name]
            if value is None:
                continue
            target = getattr(message, field.name) if field.is_repeated or field.message_type else None
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                assert target is not None
                target.update(value)
            elif field.is_repeated:
                assert target is not None
                target.extend(v for v in value if v is not None)
            elif field.message_type is not None:
                assert target is not None
                target.CopyFrom(value)
            else:
                setattr(message, field.name, value)
        return message

    return st.fixed_dictionaries(fields).map(build)


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with agent_server(tmp_path_factory.mktemp("agent")) as server:
        yield server
        assert not problems_in_log(server.log_text())


@pytest.fixture(scope="module")
def hostd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with hostd_server(tmp_path_factory.mktemp("hostd")) as server:
        yield server
        assert not problems_in_log(server.log_text())


def check(server: Server, method: MethodDescriptor, payload: bytes) -> None:
    with grpc.insecure_channel(server.target) as channel:
        # a stream that never ends by itself (WatchVMs) is cut by the deadline
        code = call_raw(channel, method, payload, 0.5 if method.server_streaming else TIMEOUT)
    assert code not in FORBIDDEN, (method.name, code, payload[:200])


CASES = [("agent", m) for m in AGENT_SERVICE.methods] + [("hostd", m) for m in HOST_SERVICE.methods]


@pytest.mark.parametrize(("daemon", "method"), CASES, ids=[f"{d}-{m.name}" for d, m in CASES])
@SETTINGS
@given(data=st.data())
def test_every_rpc(
    request: pytest.FixtureRequest, daemon: str, method: MethodDescriptor, data: st.DataObject
) -> None:
    """A message built from the method's fields, or any bytes at all."""
    server: Server = request.getfixturevalue(daemon)
    messages = message_strategy(method.input_type).map(lambda m: m.SerializeToString())
    payload = data.draw(messages | st.binary(max_size=512), label="request bytes")
    check(server, method, payload)


def test_the_strategies_cover_every_field() -> None:
    """Every field of every request message has a strategy (a new field type would fail here)."""
    for service in (AGENT_SERVICE, HOST_SERVICE):
        for method in service.methods:
            message_strategy(method.input_type)  # built eagerly: an unknown field type raises
