"""pdq's Hydra configs; installed as the package `pdq.conf` (see setup.py and pdq.config)."""
