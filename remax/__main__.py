"""``python -m remax ...`` = the ``remax`` command."""

from __future__ import annotations

import sys

from remax.cli import main

sys.exit(main())
