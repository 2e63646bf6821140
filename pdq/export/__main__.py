"""`python -m pdq.export ...`: the same as `pdq export ...`."""

import sys

from pdq.export.cli import main

sys.exit(main())
