"""Exercise 0.1: The popped sequence

The stack task of chapter 0 (section 0.4) answers with what is *left* on the stack. Write
`popped_sequence(prompt)`, the other natural answer: the digits the pops *remove*, in the order
they come off.

A stack prompt is "K", then the operations, then "=". A digit pushes that digit and "-" pops the
top of the stack, which starts empty. For example

    popped_sequence("K31-4-=") == "14"     push 3, push 1, pop -> 1, push 4, pop -> 4
    popped_sequence("K12--=")  == "21"
    popped_sequence("K7=")     == ""       nothing was popped

Raise ValueError when
- the prompt is not a stack prompt: it must start with "K", end with "=", and hold only digits
  and "-" in between (an empty program "K=" is allowed and pops nothing);
- a pop finds the stack empty ("K1--=").

Grade it with `python -m looplm.grade ch00`, or run
`pytest exercises/ch00/test_ex1_popped_sequence.py`.
"""


def popped_sequence(prompt: str) -> str:
    """The digits the pops of a stack prompt remove, in the order they are removed."""
    raise NotImplementedError("Exercise 0.1: write popped_sequence")
