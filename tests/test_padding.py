"""Padding token lists into batches: widths rounded up to a multiple, and every token kept."""

import pytest

from lm_gym.padding import pad_left, pad_right, round_up


def test_pad_left_rounds_the_width_up_and_keeps_every_token():
    sequences = [[5, 6, 7], [8]]
    ids, mask = pad_left(sequences, 0, "cpu", multiple=4)
    assert ids.tolist() == [[0, 5, 6, 7], [0, 0, 0, 8]] and mask.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert pad_left(sequences, 0, "cpu")[0].shape == (2, 3)  # multiple=1: the longest row's width
    ids, mask = pad_right(sequences, 0, "cpu")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.sum().item() == 4


@pytest.mark.parametrize("count, multiple, expected", [(0, 32, 0), (1, 32, 32), (32, 32, 32), (33, 32, 64), (7, 1, 7)])
def test_round_up(count, multiple, expected):
    assert round_up(count, multiple) == expected
