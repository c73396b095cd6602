# Generated from book/91_appendix_results.py: edit the chapter, then run `make export`.
# fmt: off
__all__ = []
# fmt: on

import looplm.experiments  # noqa: F401  (registers the chapters' experiments)
from looplm.results import main

# --- book/91_appendix_results.py:374 (cell 15) ---
if __name__ == "__main__" and "get_ipython" not in globals():
    raise SystemExit(main())
