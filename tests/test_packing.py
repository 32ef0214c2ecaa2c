"""Sequence packing (data/packing.py): first-fit-decreasing and the row length chosen by cost."""
from gptstack.data.packing import cheapest_packing, first_fit_decreasing


def test_first_fit_decreasing_hand_worked():
    # longest first: 9 opens bin 0; 7 and 5 fit no open bin, so they open bins 1 and 2; 3 fits
    # bin 1 (7 + 3 = 10); each 2 overflows bins 0 and 1 and goes to bin 2 (5 + 2 + 2)
    lengths = [3, 9, 2, 7, 5, 2]
    bins = first_fit_decreasing(lengths, capacity=10)
    assert bins == [[1], [3, 0], [4, 2, 5]]
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert first_fit_decreasing([12, 3], capacity=10) == [[0], [1]]   # too long: a bin of its own


def test_cheapest_packing_trades_padding_for_attention():
    # free attention: the fewest padded positions, i.e. the longest rows allowed
    mixed = [40, 37, 50, 90, 100, 70, 71, 120, 88, 84, 84, 84, 100, 100, 60, 64]
    free = cheapest_packing(mixed, 256, pair_cost=0.0)
    assert len(free) < len(mixed)
    # one prompt's equal-length samples: packing only lengthens rows, so each stays alone
    assert cheapest_packing([84] * 7 + [60], 256, pair_cost=1 / 1280) == [[i] for i in range(8)]
    # the choice minimises rows x L x (1 + c L) over the capacities tried
    for c in (0.0, 1 / 1280, 1 / 100):
        bins = cheapest_packing(mixed, 256, pair_cost=c)

        def cost(b):
            L = max(sum(mixed[i] for i in row) for row in b)
            return len(b) * L * (1 + c * L)
        assert all(cost(bins) <= cost(first_fit_decreasing(mixed, cap)) for cap in (120, 180, 240, 256))
