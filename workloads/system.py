"""Guest-only workloads: fio (storage), memory bandwidth, sysbench / stress-ng (system).

They run entirely in the guest: :meth:`guest_commands` gives the argv lists of one case,
:meth:`parse_guest` reads their stdouts in the same order.

fio follows the study (docs/study.md, "Network and storage parameters"):
libaio, ``direct=1``, ``time_based``, runtime 30 s after a 20 s ramp, and the job set

    alat-{randread,randwrite,read,write}   bs 4k    iodepth 1    numjobs 1   (latency)
    bw-{read,write}                        bs 128k  iodepth 128  numjobs 4   (bandwidth)
    iops-{randread,randwrite,rw}           bs 4k    iodepth 32   numjobs 4   (IOPS; rw 70/30)

each job its own fio process (one case), so jobs never overlap. The study ran them on a raw
NVMe disk; here the target is a scratch *file* in a directory that is a parameter. Because
the agent writes where the host says, the directory must be a scratch prefix or lie below
one (:data:`FIO_PREFIXES`), and the file goes into a private directory the runner makes
there for each run and removes after it (:func:`workloads.execute.own_scratch_dir`): fio
lays a file out by unlinking and re-creating its path, and an untrusted host must not be
able to make the agent overwrite or delete the guest's own files. O_DIRECT needs a file
system that supports it (ext4, xfs; not tmpfs).

memory: Debian packages neither the Phoronix suite nor STREAM, so bandwidth comes from mbw
(``memcpy``, a byte loop, and block ``memcpy``) and sysbench memory (sequential and random
reads and writes in 1 KiB blocks), whose per-event latency is recorded as well.

sysbench: the "unixbench-style" system suite from what Debian ships: ``sysbench cpu``
(primes up to 20000), ``sysbench threads`` (mutex/yield scheduling), and stress-ng
stressors with ``--metrics`` (bogo-ops per second; comparable only between runs of the
same stress-ng version, which is recorded).
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Mapping
from typing import Any, ClassVar

from cvmcore.errors import UsageError
from workloads import parsers
from workloads.capabilities import SCRATCH_DISK, Capabilities
from workloads.model import Param, Sample, Workload

# job name -> (fio --rw, block size, iodepth, numjobs, extra arguments)
FIO_JOBS: dict[str, tuple[str, str, int, int, tuple[str, ...]]] = {
    "alat-randread": ("randread", "4k", 1, 1, ()),
    "alat-randwrite": ("randwrite", "4k", 1, 1, ()),
    "alat-read": ("read", "4k", 1, 1, ()),
    "alat-write": ("write", "4k", 1, 1, ()),
    "bw-read": ("read", "128k", 128, 4, ()),
    "bw-write": ("write", "128k", 128, 4, ()),
    "iops-randread": ("randread", "4k", 32, 4, ()),
    "iops-randwrite": ("randwrite", "4k", 32, 4, ()),
    "iops-rw": ("rw", "4k", 32, 4, ("--rwmixread=70",)),
}

# Where the fio scratch file may live (see the module docstring).
FIO_PREFIXES = ("/var/tmp/", "/tmp/", "/mnt/", "/srv/", "/scratch/")
FIO_FILE = "cvmctl-fio.scratch"
MAX_PATH = 1024


def cpu_count() -> int:
    return os.cpu_count() or 1


def split_names(text: str, allowed: Mapping[str, object] | tuple[str, ...], param: str) -> list[str]:
    """``"a,b"`` -> ["a", "b"], each checked against ``allowed`` ("all" means every one)."""
    names = list(allowed) if text == "all" else [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        if name not in allowed:
            raise UsageError(
                f"parameter {param}: {name!r} is not allowed (expected all, or a comma-separated "
                f"list of {', '.join(allowed)})"
            )
    if not names:
        raise UsageError(f"parameter {param}: empty (expected all, or names from {', '.join(allowed)})")
    return names


class Fio(Workload):
    """The study's fio job set on a scratch file, one case per job."""

    name = "fio"
    summary = "storage latency, bandwidth and IOPS: the study's 9 fio jobs (libaio, direct) on a scratch file"
    params = (
        Param(
            "directory",
            "str",
            "/var/tmp",
            "where the scratch file goes (/var/tmp, /tmp, /mnt, /srv, /scratch or below; not tmpfs), "
            "in a private directory made for each run and removed after it; "
            "default: the target's scratch disk",
        ),
        Param("size_mb", "int", 1024, "size of the scratch file in MiB", minimum=1, maximum=1 << 22),
        Param("runtime", "int", 30, "seconds measured per job (after the ramp)", minimum=1, maximum=3600),
        Param("ramp", "int", 20, "seconds of ramp before measuring, per job", minimum=0, maximum=3600),
        Param("jobs", "str", "all", "all, or a comma-separated subset of " + ", ".join(FIO_JOBS)),
        Param("direct", "bool", True, "O_DIRECT (the study: yes)"),
    )
    guest_tools: ClassVar[dict[str, str]] = {"fio": "fio"}
    needs = frozenset({SCRATCH_DISK})

    scratch_dir_param = "directory"

    def for_target(
        self, params: dict[str, Any], capabilities: Capabilities, explicit: frozenset[str]
    ) -> dict[str, Any]:
        """The scratch file on the target's scratch disk, unless the directory was set."""
        directory = capabilities.offered.get(SCRATCH_DISK, "")
        if "directory" in explicit or not directory.startswith("/"):
            return params
        out = {**params, "directory": posixpath.normpath(directory)}
        self.check(out)
        return out

    def check_scratch_dir(self, real_path: str) -> None:
        # A symbolic link under /tmp must not lead fio's writes elsewhere (/, /etc).
        allowed = [os.path.realpath(prefix) for prefix in FIO_PREFIXES]
        if not any(real_path == p or real_path.startswith(p.rstrip("/") + "/") for p in allowed):
            raise UsageError(
                f"parameter directory: it leads to {real_path!r}, which is not below "
                f"{', '.join(p.rstrip('/') for p in FIO_PREFIXES)}"
            )

    def check(self, params: dict[str, Any]) -> None:
        split_names(params["jobs"], FIO_JOBS, "jobs")
        path = params["directory"]
        normal = posixpath.normpath(path)
        under = path.startswith(FIO_PREFIXES) or f"{path}/" in FIO_PREFIXES
        if normal != path or not under or ":" in path or len(path) > MAX_PATH:
            raise UsageError(
                f"parameter directory: {path!r} is not allowed (expected a normalised directory path, "
                f"{', '.join(p.rstrip('/') for p in FIO_PREFIXES)} or below, without ':')"
            )

    def cases(self, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        return [{**params, "jobs": job} for job in split_names(params["jobs"], FIO_JOBS, "jobs")]

    def scaled(self, params: dict[str, Any], duration_seconds: float) -> dict[str, Any]:
        per_job = duration_seconds / len(self.cases(params))
        return {**params, "runtime": max(1, round(per_job * 0.7)), "ramp": max(0, round(per_job * 0.3))}

    def timeout(self, params: Mapping[str, Any]) -> float:
        # Laying out the file the first time is part of the first job.
        return float((params["runtime"] + params["ramp"]) * 2 + 60 + params["size_mb"] / 50)

    def guest_commands(self, params: Mapping[str, Any]) -> list[list[str]]:
        job = params["jobs"]
        rw, bs, iodepth, numjobs, extra = FIO_JOBS[job]
        return [
            [
                "fio",
                "--output-format=json",
                f"--name={job}",
                f"--filename={posixpath.join(params['directory'], FIO_FILE)}",
                f"--size={params['size_mb']}M",
                "--ioengine=libaio",
                f"--direct={int(params['direct'])}",
                "--time_based",
                f"--runtime={params['runtime']}",
                f"--ramp_time={params['ramp']}",
                "--group_reporting",
                f"--rw={rw}",
                f"--bs={bs}",
                f"--iodepth={iodepth}",
                f"--numjobs={numjobs}",
                *extra,
            ]
        ]

    def parse_guest(self, outputs: list[str], params: Mapping[str, Any]) -> list[Sample]:
        version, directions = parsers.parse_fio(outputs[0])
        job = params["jobs"]
        meta = {"tool": "fio", "version": version, "job": job}
        samples: list[Sample] = []
        for direction, d in directions.items():
            prefix = f"{job}_{direction}"
            samples += [
                Sample(f"{prefix}_iops", d.iops, "IOPS", "higher", meta),
                Sample(f"{prefix}_bw", d.bw_bytes_per_second / 2**20, "MiB/s", "higher", meta),
                Sample(f"{prefix}_lat_mean", d.lat_mean_ns / 1e3, "us", "lower", meta),
            ]
        return samples


class Memory(Workload):
    """Memory bandwidth (mbw, sysbench memory) and sysbench's per-block latency."""

    name = "memory"
    summary = "memory bandwidth: mbw (memcpy, dumb, mcblock) and sysbench memory (seq/rnd, read/write)"
    MBW_METHODS: ClassVar[dict[str, str]] = {"memcpy": "0", "dumb": "1", "mcblock": "2"}
    SYSBENCH_MODES: ClassVar[tuple[tuple[str, str], ...]] = (
        ("seq", "read"),
        ("seq", "write"),
        ("rnd", "read"),
        ("rnd", "write"),
    )
    params = (
        Param("mbw_mib", "int", 256, "mbw array size in MiB", minimum=1, maximum=1 << 16),
        Param("mbw_runs", "int", 10, "mbw iterations averaged per method (-n)", minimum=1, maximum=10000),
        Param("sysbench_time", "int", 10, "seconds per sysbench memory mode", minimum=1, maximum=3600),
        Param("block_kib", "int", 1, "sysbench memory block size in KiB", minimum=1, maximum=1 << 20),
        Param("threads", "int", 1, "sysbench threads", minimum=1, maximum=1024),
    )
    guest_tools: ClassVar[dict[str, str]] = {"mbw": "mbw", "sysbench": "sysbench"}
    duration_param = "sysbench_time"

    def scaled(self, params: dict[str, Any], duration_seconds: float) -> dict[str, Any]:
        # mbw is count-based and short; the four sysbench modes take the time.
        runs = max(1, min(params["mbw_runs"], 3))
        return {**params, "mbw_runs": runs, "sysbench_time": max(1, round(duration_seconds * 0.8 / 4))}

    def timeout(self, params: Mapping[str, Any]) -> float:
        return float(params["sysbench_time"] * 2 + 60 + params["mbw_runs"] * params["mbw_mib"] / 100)

    def guest_commands(self, params: Mapping[str, Any]) -> list[list[str]]:
        commands = [
            ["mbw", "-q", "-n", str(params["mbw_runs"]), f"-t{code}", str(params["mbw_mib"])]
            for code in self.MBW_METHODS.values()
        ]
        for mode, oper in self.SYSBENCH_MODES:
            commands.append(
                [
                    "sysbench",
                    "memory",
                    f"--memory-block-size={params['block_kib']}K",
                    "--memory-total-size=100T",
                    f"--memory-oper={oper}",
                    f"--memory-access-mode={mode}",
                    f"--threads={params['threads']}",
                    f"--time={params['sysbench_time']}",
                    "run",
                ]
            )
        return commands

    def parse_guest(self, outputs: list[str], params: Mapping[str, Any]) -> list[Sample]:
        samples: list[Sample] = []
        n_mbw = len(self.MBW_METHODS)
        for method, output in zip(self.MBW_METHODS, outputs[:n_mbw], strict=True):
            averages = parsers.parse_mbw(output)
            value = next(iter(averages.values()))
            samples.append(Sample(f"mbw_{method}", value, "MiB/s", "higher", {"tool": "mbw"}))
        for (mode, oper), output in zip(self.SYSBENCH_MODES, outputs[n_mbw:], strict=True):
            result = parsers.parse_sysbench(output)
            if result.mib_per_second is None:
                raise parsers.ParseError("sysbench memory: no 'MiB transferred' line")
            meta = {"tool": "sysbench"}
            samples.append(Sample(f"sysbench_{mode}_{oper}", result.mib_per_second, "MiB/s", "higher", meta))
            events_per_s = result.events / result.total_time_s
            samples.append(Sample(f"sysbench_{mode}_{oper}_ops", events_per_s, "ops/s", "higher", meta))
        return samples


STRESSORS = ("cpu", "switch", "pipe", "matrix", "memcpy", "futex", "vm")
#: stress-ng writes its YAML to a path: our stdout, through procfs. Not /dev/stdout: that
#: symlink is made by udev or systemd, and a guest with a bare devtmpfs (the dev guest's
#: initramfs) has none, so stress-ng could not open it, said so on stderr, exited 0 and left
#: no metrics.
STDOUT_PATH = "/proc/self/fd/1"


class Sysbench(Workload):
    """sysbench cpu and threads, then stress-ng stressors: events and bogo-ops per second."""

    name = "sysbench"
    summary = "system suite: sysbench cpu and threads, stress-ng stressors (bogo-ops/s)"
    params = (
        Param("threads", "int", 0, "threads / stressor instances; 0: every CPU", minimum=0, maximum=1024),
        Param("time", "int", 10, "seconds per test", minimum=1, maximum=3600),
        Param("cpu_max_prime", "int", 20000, "sysbench cpu --cpu-max-prime", minimum=10, maximum=10**7),
        Param(
            "stressors",
            "str",
            "cpu,switch,pipe",
            "stress-ng stressors: comma-separated from " + ", ".join(STRESSORS),
        ),
    )
    guest_tools: ClassVar[dict[str, str]] = {"sysbench": "sysbench", "stress-ng": "stress-ng"}
    duration_param = "time"

    def check(self, params: dict[str, Any]) -> None:
        split_names(params["stressors"], STRESSORS, "stressors")

    def scaled(self, params: dict[str, Any], duration_seconds: float) -> dict[str, Any]:
        tests = 2 + len(split_names(params["stressors"], STRESSORS, "stressors"))
        return {**params, "time": max(1, round(duration_seconds / tests))}

    def timeout(self, params: Mapping[str, Any]) -> float:
        return float(params["time"] * 3 + 30)

    def guest_commands(self, params: Mapping[str, Any]) -> list[list[str]]:
        threads = str(params["threads"] or cpu_count())
        time = str(params["time"])
        commands = [
            [
                "sysbench",
                "cpu",
                f"--cpu-max-prime={params['cpu_max_prime']}",
                f"--threads={threads}",
                f"--time={time}",
                "run",
            ],
            ["sysbench", "threads", f"--threads={threads}", f"--time={time}", "run"],
        ]
        for stressor in split_names(params["stressors"], STRESSORS, "stressors"):
            commands.append(
                [
                    "stress-ng",
                    f"--{stressor}",
                    threads,
                    "-t",
                    time,
                    "--metrics-brief",
                    "--yaml",
                    STDOUT_PATH,
                ]
            )
        return commands

    def parse_guest(self, outputs: list[str], params: Mapping[str, Any]) -> list[Sample]:
        cpu = parsers.parse_sysbench(outputs[0])
        threads = parsers.parse_sysbench(outputs[1])
        if cpu.events_per_second is None:
            raise parsers.ParseError("sysbench cpu: no 'events per second' line")
        meta = {"tool": "sysbench"}
        samples = [
            Sample("sysbench_cpu", cpu.events_per_second, "events/s", "higher", meta),
            Sample("sysbench_threads", threads.events / threads.total_time_s, "events/s", "higher", meta),
        ]
        for stressor, output in zip(
            split_names(params["stressors"], STRESSORS, "stressors"), outputs[2:], strict=True
        ):
            metrics = parsers.parse_stress_ng_yaml(output)
            if stressor not in metrics:
                raise parsers.ParseError(f"stress-ng: no metrics for the {stressor} stressor")
            value = metrics[stressor].get("bogo-ops-per-second-real-time")
            if value is None:
                raise parsers.ParseError(f"stress-ng: no bogo-ops-per-second-real-time for {stressor}")
            samples.append(Sample(f"stress_{stressor}", value, "bogo-ops/s", "higher", {"tool": "stress-ng"}))
        return samples
