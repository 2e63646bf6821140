"""`python -m pdq.mixed ...`: the same as `pdq sensitivity ...`."""

import sys

from pdq.mixed.cli import main

sys.exit(main())
