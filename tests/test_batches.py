"""The one batch sampler (data/batches.py) and the one held-out rule (data/split.py)."""
import numpy as np

from gptstack.data.batches import batch_indices
from gptstack.data.split import is_heldout


def test_ranks_split_one_global_batch_in_both_ways_of_drawing():
    for replace in (False, True):
        one = batch_indices(50, 8, seed=3, step=5, micro=1, grad_accum=2, replace=replace)
        two = [batch_indices(50, 4, seed=3, step=5, micro=1, grad_accum=2, rank=r, world=2, replace=replace)
               for r in range(2)]
        assert one.tolist() == np.concatenate(two).tolist()


def test_draws_with_replacement_are_a_seeded_generator_per_step_and_micro_batch():
    expected = np.random.default_rng([7, 3, 1]).integers(0, 20, size=12)[4:8]
    assert batch_indices(20, 4, seed=7, step=3, micro=1, rank=1, world=3, replace=True).tolist() == expected.tolist()


def test_epochs_visit_every_row_once_and_cross_epoch_boundaries():
    stream = np.concatenate([batch_indices(10, 4, seed=0, step=s) for s in range(5)]).tolist()   # 2 epochs
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream[:10] != stream[10:20]   # a fresh shuffle each epoch


def test_heldout_rule_reads_a_prompt_text_as_one_user_turn():
    for i in range(50):
        text = f"What is {i} + 1?"
        assert is_heldout(text, 0.3) == is_heldout([{"role": "user", "content": text}], 0.3)
    held = [is_heldout(f"q{i}", 0.25) for i in range(4000)]
    assert 0.22 < sum(held) / len(held) < 0.28
    assert not any(is_heldout(f"q{i}", 0.0) for i in range(100))
