"""The TEE names cvmctl uses everywhere ("none", "sev-snp", "tdx") and their wire enum."""

from __future__ import annotations

from cvm.v1 import common_pb2

TEE_TO_PROTO: dict[str, common_pb2.Tee.ValueType] = {
    "none": common_pb2.TEE_NONE,
    "sev-snp": common_pb2.TEE_SEV_SNP,
    "tdx": common_pb2.TEE_TDX,
}
_NAMES: dict[common_pb2.Tee.ValueType, str] = {value: name for name, value in TEE_TO_PROTO.items()}


def tee_to_proto(name: str) -> common_pb2.Tee.ValueType:
    """The enum value of a TEE name; TEE_UNSPECIFIED for anything else."""
    return TEE_TO_PROTO.get(name, common_pb2.TEE_UNSPECIFIED)


def tee_name(value: common_pb2.Tee.ValueType) -> str:
    """The name of an enum value; "unknown" for TEE_UNSPECIFIED or a value from a newer peer."""
    return _NAMES.get(value, "unknown")
