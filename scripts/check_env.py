"""Exit 0 when this checkout's pdq is installed (editable, with its current console scripts) and every package in
constraints.txt is installed at its exact version; `make deps` installs otherwise."""

import configparser
import re
import sys
from importlib.metadata import PackageNotFoundError, distribution, version
from pathlib import Path

root = Path(__file__).resolve().parent.parent
cfg = configparser.ConfigParser()
cfg.read(root / "setup.cfg")
scripts = {line.split("=")[0].strip() for line in cfg["options.entry_points"]["console_scripts"].split("\n") if line}
pins = [line.split("==") for line in (root / "constraints.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")]
try:
    for name, pin in pins:
        installed = version(name)
        if installed.split("+")[0] != pin:
            sys.exit(f"{name} {installed} installed, {pin} required (constraints.txt)")
    pdq_dist = distribution("pdq")
    sys.path.insert(0, str(root))  # the checkout's pdq, as `python run.py` and pytest import it
    import pdq
except PackageNotFoundError as e:
    sys.exit(f"missing: {e}")
if pdq_dist.version != pdq.__version__:
    sys.exit(f"pdq {pdq_dist.version} is installed, this checkout is {pdq.__version__}")
installed_scripts = {ep.name for ep in pdq_dist.entry_points if ep.group == "console_scripts"}
if installed_scripts != scripts:
    sys.exit(f"pdq is installed with the commands {sorted(installed_scripts)}, setup.cfg has {sorted(scripts)}")
if not re.search(re.escape(str(root)), (pdq_dist.read_text("direct_url.json") or "")):
    sys.exit(f"pdq is not installed from this checkout ({root})")
