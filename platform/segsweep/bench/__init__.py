"""``segsweep bench``: a developer tool, outside the runtime import chain."""
