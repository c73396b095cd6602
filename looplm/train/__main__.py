# Generated from book/04a_appendix_engineering.py, book/11a_appendix_processes.py: edit the chapter, then run `make export`.
# fmt: off
__all__ = []
# fmt: on

import looplm.distributed  # noqa: F401  (registers --parallel ddp and --parallel fsdp)
from looplm.train import main

# --- book/04a_appendix_engineering.py:2128 (cell 79) ---
if __name__ == "__main__" and "get_ipython" not in globals():
    raise SystemExit(main())
