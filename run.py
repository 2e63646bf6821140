"""`python run.py [overrides]` in a checkout: the `pdq` command (pdq.cli), for those who run pdq from its
repository without installing it."""

from pdq.cli import main

if __name__ == "__main__":
    main()
