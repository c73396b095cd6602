"""Exercise 0.1: The popped sequence

Reference solution: run the stack and record every pop.
"""


def popped_sequence(prompt: str) -> str:
    """The digits the pops of a stack prompt remove, in the order they are removed."""
    if not isinstance(prompt, str) or len(prompt) < 2 or prompt[0] != "K" or prompt[-1] != "=":
        raise ValueError(f"a stack prompt looks like 'K…=', got {prompt!r}")
    stack, popped = [], []
    for position, op in enumerate(prompt[1:-1], start=1):
        if op in "0123456789":
            stack.append(op)
        elif op != "-":
            raise ValueError(f"operation {position} of {prompt!r} is {op!r}; use a digit or '-'")
        elif not stack:
            raise ValueError(f"operation {position} of {prompt!r} pops an empty stack")
        else:
            popped.append(stack.pop())
    return "".join(popped)
