# Generated from book/00_tasks_and_tokens.py: edit the chapter, then run `make export`.
# fmt: off
__all__ = ['run_tests']
# fmt: on

# --- book/00_tasks_and_tokens.py, cell 5 ---
def run_tests(*tests):
    """Run test functions inside a notebook: one line per test, and the first failure raises."""
    if not tests:
        raise ValueError("run_tests needs at least one test function")
    for test in tests:
        if not callable(test):
            raise TypeError(f"run_tests takes test functions, got {test!r}")
        test()  # an AssertionError (or any error) propagates: the cell fails
        print(f"✓ {test.__name__}")
    print(f"{len(tests)} passed")
