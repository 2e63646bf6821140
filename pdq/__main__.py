"""`python -m pdq ...`: the `pdq` command (pdq.cli)."""

from pdq.cli import main

main()
