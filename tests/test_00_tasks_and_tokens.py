# Generated from book/00_tasks_and_tokens.py: edit the chapter, then run `make export`.

import random
import re

import pytest
import torch

from looplm.checks import (  # noqa: F401
    ArgumentTypeError,
    require_int,
    require_number,
    require_bool,
    require_choice,
)
from looplm.data import (  # noqa: F401
    CharVocab,
    TASK_VOCAB,
    Example,
    Task,
    AdditionTask,
    ParenthesesTask,
    SortingTask,
    StackTask,
    TASKS,
    make_task,
    TaskSplits,
    make_splits,
    IGNORE_INDEX,
    TaskBatch,
    encode_examples,
    decode_answer,
    ExactMatch,
    exact_match,
    answer_accuracy,
    load_corpus,
    CompactTokenizer,
    train_val_split,
    text_batches,
)
from looplm.testing import (  # noqa: F401
    run_tests,
)

# --- book/00_tasks_and_tokens.py:327 (cell 22) ---
def test_vocab_round_trips_every_character():
    text = TASK_VOCAB.chars * 2
    assert TASK_VOCAB.decode(TASK_VOCAB.encode(text)) == text
    assert TASK_VOCAB.encode(text)[: TASK_VOCAB.vocab_size] == list(range(TASK_VOCAB.vocab_size))
    assert TASK_VOCAB.decode(torch.tensor([19, 3, 14])) == "A1="


def test_vocab_errors():
    with pytest.raises(ValueError, match="'x' at position 2"):
        TASK_VOCAB.encode("A1x2=")
    with pytest.raises(ValueError, match=r"token id 99 is out of range \[0, 23\)"):
        TASK_VOCAB.decode([3, 99])
    with pytest.raises(ValueError, match="1-D integer tensor"):
        TASK_VOCAB.decode(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="distinct"):
        CharVocab("aab")

# --- book/00_tasks_and_tokens.py:531 (cell 35) ---
def test_addition_matches_integer_arithmetic():
    for difficulty in range(1, 8):
        for example in AdditionTask().sample(100, difficulty, seed=difficulty):
            a, b = re.fullmatch(r"A(\d+)\+(\d+)=", example.prompt).groups()
            assert len(a) == len(b) == difficulty and (difficulty == 1 or a[0] != "0" != b[0])
            assert example.answer == str(int(a) + int(b))
    for example in AdditionTask(reverse_answer=True).sample(100, difficulty=5, seed=0):
        a, b = example.prompt[1:-1].split("+")
        assert example.answer == str(int(a) + int(b))[::-1]

# --- book/00_tasks_and_tokens.py:603 (cell 40) ---
def test_parentheses_match_pair_deletion():
    def balanced_by_deletion(text):
        while "()" in text:
            text = text.replace("()", "")
        return text == ""

    labels = []
    for difficulty in range(1, 8):
        for example in ParenthesesTask().sample(100, difficulty, seed=difficulty):
            body = example.prompt[1:-1]
            assert body.count("(") == body.count(")") == difficulty
            assert example.answer == ("T" if balanced_by_deletion(body) else "F")
            labels.append(example.answer)
    assert 0.4 < labels.count("T") / len(labels) < 0.6

# --- book/00_tasks_and_tokens.py:658 (cell 45) ---
def test_sorting_matches_sorted():
    for difficulty in range(1, 10):
        for example in SortingTask().sample(100, difficulty, seed=difficulty):
            digits = example.prompt[1:-1]
            assert len(digits) == difficulty and example.answer == "".join(sorted(digits))

# --- book/00_tasks_and_tokens.py:728 (cell 50) ---
def test_stack_matches_cancellation_from_the_right():
    def surviving_pushes(ops):
        kept, pending_pops = [], 0
        for op in reversed(ops):
            if op == "-":
                pending_pops += 1
            elif pending_pops:
                pending_pops -= 1
            else:
                kept.append(op)
        return "".join(reversed(kept))

    answers = []
    for difficulty in range(1, 12):
        for example in StackTask().sample(100, difficulty, seed=difficulty):
            assert len(example.prompt) == difficulty + 2
            assert example.answer == surviving_pushes(example.prompt[1:-1])
            answers.append(example.answer)
    assert "" in answers and any(len(a) > 3 for a in answers)

# --- book/00_tasks_and_tokens.py:792 (cell 57) ---
def test_generators_are_reproducible_and_depend_on_the_seed():
    for name in TASKS:
        task = make_task(name)
        assert task.sample(50, 4, seed=1) == task.sample(50, 4, seed=1)
        assert task.sample(50, 4, seed=1) != task.sample(50, 4, seed=2)
        assert task.sample(5, 4, seed="a") == task.sample(5, 4, seed="a")


def test_pinned_examples():
    # a seeded random.Random gives the same numbers everywhere: these must never change
    assert make_task("addition").sample(1, 3, seed=0)[0] == Example("A964+494=", "1458", 3)
    assert make_task("parentheses").sample(1, 4, seed=0)[0] == Example("P))(()(()=", "F", 4)
    assert make_task("sorting").sample(1, 6, seed=0)[0] == Example("S660487=", "046678", 6)
    assert make_task("stack").sample(1, 5, seed=0)[0] == Example("K6-684=", "684", 5)


def test_task_errors():
    with pytest.raises(ValueError, match="difficulty"):
        AdditionTask().sample(3, difficulty=0)
    with pytest.raises(TypeError, match="difficulty"):
        SortingTask().sample(3, difficulty=2.0)
    with pytest.raises(ValueError, match="valid tasks: addition, parentheses, sorting, stack"):
        make_task("multiplication")
    with pytest.raises(ValueError, match="pops an empty stack"):
        StackTask().solve("K1--=")
    with pytest.raises(ValueError, match="prompt"):
        AdditionTask().solve("S12=")
    with pytest.raises(TypeError, match="reverse_answer"):
        AdditionTask(reverse_answer="yes")
    with pytest.raises(ValueError, match="task 'sorting' takes no options; got reverse_answer"):
        make_task("sorting", reverse_answer=True)
    with pytest.raises(ValueError, match="task 'addition' takes the options reverse_answer; got carry"):
        make_task("addition", carry=True)

# --- book/00_tasks_and_tokens.py:1108 (cell 80) ---
def test_batch_targets_are_exactly_the_answers():
    examples = []
    for name in TASKS:
        examples += make_task(name).sample(20, difficulty=5, seed=0)
    batch = encode_examples(examples)
    assert batch.idx.dtype == batch.targets.dtype == torch.long
    assert batch.idx.shape == batch.targets.shape == (len(examples), max(
        len(ex.prompt) + len(ex.answer) for ex in examples))
    for row, example in enumerate(examples):
        length = len(example.prompt) + len(example.answer)  # input positions in use
        assert TASK_VOCAB.decode(batch.idx[row, :length]) == example.prompt + example.answer
        assert (batch.idx[row, length:] == TASK_VOCAB.pad_id).all()
        kept = batch.targets[row] != IGNORE_INDEX
        expected = torch.zeros_like(kept)
        expected[len(example.prompt) - 1 : length] = True
        assert torch.equal(kept, expected)
        assert TASK_VOCAB.decode(batch.targets[row][kept]) == example.answer + "."
    moved = batch.to("cpu")
    assert torch.equal(moved.idx, batch.idx) and torch.equal(moved.answer_mask, batch.answer_mask)


def test_max_seq_len_is_enough_and_seq_len_pads():
    for name in TASKS:
        task = make_task(name)
        for difficulty in (1, 3, 6):
            examples = task.sample(200, difficulty, seed=0)
            batch = encode_examples(examples, seq_len=task.max_seq_len(difficulty))
            assert batch.idx.shape == (200, task.max_seq_len(difficulty))
    with pytest.raises(ValueError, match="seq_len=8 is too short"):
        encode_examples(AdditionTask().sample(2, 3, seed=0), seq_len=8)

# --- book/00_tasks_and_tokens.py:1604 (cell 126) ---
def test_text_batches_are_shifted_windows_of_the_stream():
    tokens = torch.arange(1000)
    idx, targets = text_batches(tokens, batch_size=8, seq_len=16, generator=torch.Generator().manual_seed(0))
    assert idx.shape == targets.shape == (8, 16) and idx.dtype == torch.long
    assert torch.equal(idx[:, 1:] - idx[:, :1], torch.arange(1, 16).expand(8, -1))  # consecutive
    assert torch.equal(targets, idx + 1) and int(targets.max()) <= 999
    again, _ = text_batches(tokens, 8, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(idx, again)
    train, val = train_val_split(tokens, val_fraction=0.1)
    assert torch.equal(torch.cat([train, val]), tokens) and len(val) == 100


def test_text_batch_errors():
    with pytest.raises(ValueError, match="seq_len=10"):
        text_batches(torch.arange(10), batch_size=2, seq_len=10)
    with pytest.raises(ValueError, match="batch_size"):
        text_batches(torch.arange(100), batch_size=0, seq_len=10)
    with pytest.raises(ValueError, match="1-D integer tensor"):
        text_batches(torch.rand(100), batch_size=2, seq_len=10)
    with pytest.raises(ValueError, match="val_fraction"):
        train_val_split(torch.arange(100), val_fraction=1.5)
