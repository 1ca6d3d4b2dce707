"""cvmcore.instance: one owner per state directory; private directories a killed owner cannot leak."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cvmcore.errors import AlreadyRunning
from cvmcore.instance import PrivateDirectory, lock_state_dir, private_directory

#: A process that makes a private directory, says where, and waits to be killed.
OWNER = """
import sys, time
from pathlib import Path
from cvmcore.instance import PrivateDirectory
directory = PrivateDirectory(sys.argv[1], Path(sys.argv[2]))
print(directory.path, flush=True)
time.sleep(600)
"""


def test_a_state_directory_has_one_owner(tmp_path: Path) -> None:
    fd = lock_state_dir(tmp_path, "cvm-test")
    try:
        with pytest.raises(AlreadyRunning, match=rf"another cvm-test \(pid {os.getpid()}\) is using"):
            lock_state_dir(tmp_path, "cvm-test")
    finally:
        os.close(fd)
    os.close(lock_state_dir(tmp_path, "cvm-test"))  # free again once the owner let go


@pytest.mark.parametrize("prefix", ["cvm-grpc-", "cvmctl-server-", "cvmctl-relay-"])
def test_a_killed_owners_directory_is_removed_by_the_next(tmp_path: Path, prefix: str) -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, prefix, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert owner.stdout is not None
    orphan = Path(owner.stdout.readline().strip())
    with private_directory(prefix, tmp_path) as alive:
        assert orphan.is_dir()  # its owner lives: left alone
        owner.send_signal(signal.SIGKILL)
        owner.wait(10)
        assert orphan.is_dir()  # SIGKILL leaves it ...
        second = PrivateDirectory(prefix, tmp_path)
        assert not orphan.exists() and alive.is_dir()  # ... the next one removes it
        second.cleanup()
        assert not second.path.exists()
    assert list(tmp_path.iterdir()) == []


def test_foreign_directories_with_the_prefix_are_left_alone(tmp_path: Path) -> None:
    (tmp_path / "cvm-grpc-not-ours").mkdir()  # no .owner: not made by cvmcore.instance
    with private_directory("cvm-grpc-", tmp_path):
        assert (tmp_path / "cvm-grpc-not-ours").is_dir()
