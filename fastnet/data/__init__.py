"""The data package. This commit only moves data.py to data/layouts.py, whole, so that its history
follows it; the next one splits it into a module per concept."""

from fastnet.data.layouts import *  # noqa: F401,F403
