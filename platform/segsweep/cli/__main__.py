"""``python -m segsweep.cli``: the ``segsweep`` command."""

import sys

from segsweep.cli import main

sys.exit(main())
