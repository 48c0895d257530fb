"""io: loading (external data, files read in place), weight access, atomic saving."""

from .core import *  # noqa: F401,F403
from .core import (  # noqa: F401  (names with a leading underscore that stages use are not re-exported)
    INLINE_LIMIT_BYTES, LAZY_EXTERNAL_BYTES, IN_PLACE_KEY,
)
