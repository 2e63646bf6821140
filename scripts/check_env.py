"""Exit 0 when this checkout's pdq and every dependency (with the dev and export extras) are installed at the pinned
versions."""

import configparser
import re
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

root = Path(__file__).resolve().parent.parent
cfg = configparser.ConfigParser()
cfg.read(root / "setup.cfg")
extras = cfg["options.extras_require"]
reqs = cfg["options"]["install_requires"].split() + extras["dev"].split() + extras["export"].split()
try:
    for req in reqs:
        name, pin = re.match(r"([A-Za-z0-9_.-]+)(?:==([^,;]+))?", req).groups()
        if name == "pdq":  # dev's `pdq[export]`: the export extra, checked with the others
            continue
        installed = version(name)
        if pin and installed.split("+")[0] != pin:
            sys.exit(f"{name} {installed} installed, {pin} required")
    import pdq
except (PackageNotFoundError, ImportError) as e:
    sys.exit(f"missing: {e}")
if Path(pdq.__file__).resolve().parent != root / "pdq":
    sys.exit(f"pdq is installed from {Path(pdq.__file__).parent}, not this checkout")
