from looplm.grade import load_exercise

ex = load_exercise(__file__)

# Graded tests for Exercise 0.2 (accuracy by difficulty). The reference counts with a plain
# Python loop; fractions are compared with rel=1e-6 (pytest.approx).

import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from looplm.data import AdditionTask, answer_accuracy, encode_examples  # noqa: E402


def reference(correct, difficulty):
    right, total = {}, {}
    for c, d in zip(correct.tolist(), difficulty.tolist()):
        right[d] = right.get(d, 0) + c
        total[d] = total.get(d, 0) + 1
    return {d: right[d] / total[d] for d in sorted(total)}


def test_small_example():
    result = ex.accuracy_by_difficulty(torch.tensor([True, False, True]), torch.tensor([2, 2, 5]))
    assert result == pytest.approx({2: 0.5, 5: 1.0}, rel=1e-6)


def test_matches_reference_on_random_data():
    rng = random.Random(0)
    for size in (1, 7, 100, 1000):
        correct = torch.tensor([rng.random() < 0.6 for _ in range(size)])
        difficulty = torch.tensor([rng.randint(1, 9) for _ in range(size)])
        result = ex.accuracy_by_difficulty(correct, difficulty)
        expected = reference(correct, difficulty)
        assert result == pytest.approx(expected, rel=1e-6)
        assert list(result) == list(expected)  # keys in increasing order
        assert all(type(k) is int and type(v) is float for k, v in result.items())


def test_on_a_task_batch():
    # a perfect teacher-forced model is right at every difficulty; breaking the 3-digit
    # examples' first answer token makes exactly difficulty 3 wrong
    examples = [AdditionTask().example(d, random.Random(k)) for k in range(12) for d in (1, 3, 5)]
    batch = encode_examples(examples)
    logits = torch.nn.functional.one_hot(batch.targets.clamp(min=0), 23).float()  # [B, T, V]
    assert ex.accuracy_by_difficulty(answer_accuracy(logits, batch.targets),
                                     batch.difficulty) == {1: 1.0, 3: 1.0, 5: 1.0}
    for row in (batch.difficulty == 3).nonzero().flatten().tolist():
        first = int(batch.answer_mask[row].nonzero()[0])
        logits[row, first] = logits[row, first].roll(1)
    assert ex.accuracy_by_difficulty(answer_accuracy(logits, batch.targets),
                                     batch.difficulty) == {1: 1.0, 3: 0.0, 5: 1.0}


def test_bad_input_raises_value_error():
    good_correct, good_difficulty = torch.tensor([True, False]), torch.tensor([1, 2])
    bad_calls = [
        (torch.tensor([1, 0]), good_difficulty),  # correct is not bool
        (good_correct, torch.tensor([1.0, 2.0])),  # difficulty is not integer
        (good_correct, torch.tensor([1, 2, 3])),  # lengths differ
        (torch.tensor([[True, False]]), torch.tensor([[1, 2]])),  # not 1-D
        (torch.tensor([], dtype=torch.bool), torch.tensor([], dtype=torch.long)),  # empty
    ]
    for correct, difficulty in bad_calls:
        with pytest.raises(ValueError):
            ex.accuracy_by_difficulty(correct, difficulty)
