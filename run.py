"""pdq's one entry point: `python run.py [hydra overrides]` (see conf/config.yaml and the README)."""

import logging
import sys

import hydra
from omegaconf import DictConfig

log = logging.getLogger("pdq")


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from pdq.errors import PdqError
    from pdq.host_memory import keep_freed_memory
    from pdq.pipeline import run

    if cfg.get("keep_freed_memory") is True:
        log.info("host memory: freed memory kept for reuse (keep_freed_memory=true): %s", keep_freed_memory())
    try:
        return run(cfg)["quant_top1"]
    except PdqError as e:
        log.error("%s", e)
        print(f"pdq: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:  # Ctrl-C: pdq.process.Interrupted says what the run saved
        log.warning("%s", e)
        print(f"pdq: {e}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
