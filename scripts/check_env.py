"""Exit 0 when this checkout's pdq and every pinned dependency are importable at the right versions."""

import configparser
import re
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

root = Path(__file__).resolve().parent.parent
cfg = configparser.ConfigParser()
cfg.read(root / "setup.cfg")
reqs = cfg["options"]["install_requires"].split() + cfg["options.extras_require"]["dev"].split()
try:
    for req in reqs:
        name, pin = re.match(r"([A-Za-z0-9_.-]+)(?:==([^,;]+))?", req).groups()
        installed = version(name)
        if pin and installed.split("+")[0] != pin:
            sys.exit(f"{name} {installed} installed, {pin} required")
    import pdq
except (PackageNotFoundError, ImportError) as e:
    sys.exit(f"missing: {e}")
if Path(pdq.__file__).resolve().parent != root / "pdq":
    sys.exit(f"pdq is installed from {Path(pdq.__file__).parent}, not this checkout")
