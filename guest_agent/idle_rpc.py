"""Mapping between the idle-polling domain types and their protobuf messages."""

from __future__ import annotations

from cvm.v1 import agent_pb2
from cvmcore.errors import UsageError
from guest_agent.idle_polling import HALTPOLL_PARAM_NAMES, HaltpollParams, IdleMode, IdlePollingStatus

MODE_TO_PROTO = {
    IdleMode.DEFAULT: agent_pb2.IDLE_MODE_DEFAULT,
    IdleMode.HALTPOLL: agent_pb2.IDLE_MODE_HALTPOLL,
    IdleMode.POLL: agent_pb2.IDLE_MODE_POLL,
}
MODE_FROM_PROTO = {value: key for key, value in MODE_TO_PROTO.items()}

# Bounds that keep a hostile or mistaken request from writing absurd values to sysfs.
MAX_HALT_POLL_NS = 10_000_000_000  # 10 s
MAX_FACTOR = 1_000


def params_to_proto(params: HaltpollParams) -> agent_pb2.HaltpollParams:
    message = agent_pb2.HaltpollParams()
    for name in HALTPOLL_PARAM_NAMES:
        value = getattr(params, name)
        if value is not None:
            setattr(message, name, value)
    return message


def params_from_proto(message: agent_pb2.HaltpollParams) -> HaltpollParams:
    present = {field.name for field, _ in message.ListFields()}

    def get(name: str, limit: int) -> int | None:
        if name not in present:
            return None
        value = int(getattr(message, name))
        if value > limit:
            raise UsageError(f"{name} = {value} is out of range (0..{limit})")
        return value

    return HaltpollParams(
        guest_halt_poll_ns=get("guest_halt_poll_ns", MAX_HALT_POLL_NS),
        guest_halt_poll_grow=get("guest_halt_poll_grow", MAX_FACTOR),
        guest_halt_poll_grow_start=get("guest_halt_poll_grow_start", MAX_HALT_POLL_NS),
        guest_halt_poll_shrink=get("guest_halt_poll_shrink", MAX_FACTOR),
        guest_halt_poll_allow_shrink=(
            message.guest_halt_poll_allow_shrink if "guest_halt_poll_allow_shrink" in present else None
        ),
    )


def mode_from_proto(value: agent_pb2.IdleMode.ValueType) -> IdleMode:
    try:
        return MODE_FROM_PROTO[value]
    except KeyError:
        raise UsageError("mode must be one of default, haltpoll, poll") from None


def status_to_proto(status: IdlePollingStatus) -> agent_pb2.IdlePollingState:
    return agent_pb2.IdlePollingState(
        mode=MODE_TO_PROTO[status.mode],
        driver=status.driver,
        governor=status.governor,
        available_governors=list(status.available_governors),
        params=params_to_proto(status.params),
        applied_mode=(
            MODE_TO_PROTO[status.applied_mode] if status.applied_mode else agent_pb2.IDLE_MODE_UNSPECIFIED
        ),
        kernel_cmdline_idle_poll=status.kernel_cmdline_idle_poll,
        notes=list(status.notes),
    )
