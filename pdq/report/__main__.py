"""`python -m pdq.report ...`: the same as `pdq report ...`."""

import sys

from pdq.report.cli import main

sys.exit(main())
