"""`python -m flows.cli` = `witclip`."""

import sys

from flows.cli import main

sys.exit(main())
