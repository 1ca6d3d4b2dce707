"""What every part of the dev guest build shares: its error and its format version."""

from __future__ import annotations

from cvmcore.errors import CvmError

# Bump when the image layout or the init protocol changes: it is part of the cache key.
FORMAT_VERSION = 1


class ImageError(CvmError):
    """The dev guest cannot be built: an input is missing or malformed."""

    exit_code = 1
