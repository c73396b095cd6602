from looplm.grade import load_exercise

ex = load_exercise(__file__)

# Graded tests for Exercise 0.1 (the popped sequence). The reference below finds each pop's
# digit without a stack: a pop removes the nearest push to its left that no pop in between has
# already removed, which a depth count (like matching parentheses) finds.

import pytest  # noqa: E402

from looplm.data import StackTask  # noqa: E402


def reference(prompt):
    ops = prompt[1:-1]
    popped = []
    for j, op in enumerate(ops):
        if op != "-":
            continue
        depth = 0
        for i in range(j - 1, -1, -1):  # walk left: pops open, pushes close
            depth += 1 if ops[i] == "-" else -1
            if depth < 0:
                popped.append(ops[i])
                break
    return "".join(popped)


def test_small_programs():
    assert ex.popped_sequence("K31-4-=") == "14"
    assert ex.popped_sequence("K12--=") == "21"
    assert ex.popped_sequence("K7=") == ""
    assert ex.popped_sequence("K=") == ""
    assert ex.popped_sequence("K5-5-5-=") == "555"


def test_matches_reference_on_generated_programs():
    # 600 programs of 1 to 12 operations from the chapter's stack task
    for difficulty in range(1, 13):
        for example in StackTask().sample(50, difficulty, seed=difficulty):
            assert ex.popped_sequence(example.prompt) == reference(example.prompt), example.prompt


def test_pushes_are_popped_or_left_on_the_stack():
    # every pushed digit is either popped or still on the stack at the end (StackTask's answer)
    for example in StackTask().sample(200, difficulty=10, seed=0):
        pushed = sorted(op for op in example.prompt[1:-1] if op != "-")
        assert sorted(ex.popped_sequence(example.prompt) + example.answer) == pushed


def test_bad_prompts_raise_value_error():
    for prompt in ("K1--=", "K-=", "A12+3=", "K12", "K1x2=", ""):
        with pytest.raises(ValueError):
            ex.popped_sequence(prompt)
