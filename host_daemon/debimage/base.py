"""The Debian guest image build's error."""

from __future__ import annotations

from cvmcore.errors import CvmError


class ImageBuildError(CvmError):
    """The Debian guest image cannot be built or found: a tool, an input or a step failed."""

    exit_code = 1
