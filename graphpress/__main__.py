"""``python -m graphpress``: the same command line as ``graphpress``."""

import sys

from graphpress.cli import main

sys.exit(main())
