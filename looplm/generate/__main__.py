# Generated from book/07a_appendix_decoding.py: edit the chapter, then run `make export`.
# fmt: off
__all__ = []
# fmt: on

from looplm.generate import main

# --- book/07a_appendix_decoding.py:417 (cell 12) ---
if __name__ == "__main__" and "get_ipython" not in globals():
    raise SystemExit(main())
