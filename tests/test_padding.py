"""Padding token lists into batches: widths rounded up to a multiple, and trimming that keeps it."""

import pytest
import torch

from lm_gym.padding import mask_positions, pad_left, pad_right, round_up, trim_left


def test_pad_left_and_right_round_the_width_up_and_keep_every_token():
    sequences = [[5, 6, 7], [8]]
    ids, mask = pad_left(sequences, 0, "cpu", multiple=4)
    assert ids.tolist() == [[0, 5, 6, 7], [0, 0, 0, 8]] and mask.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    ids, mask = pad_right(sequences, 0, "cpu", multiple=8)
    assert ids.shape == (2, 8) and ids[0, :3].tolist() == [5, 6, 7] and mask.sum().item() == 4
    assert pad_left(sequences, 0, "cpu")[0].shape == (2, 3)  # multiple=1: the longest row's width


@pytest.mark.parametrize("count, multiple, expected", [(0, 32, 0), (1, 32, 32), (32, 32, 32), (33, 32, 64), (7, 1, 7)])
def test_round_up(count, multiple, expected):
    assert round_up(count, multiple) == expected


def test_trim_left_keeps_a_multiple_of_the_width_where_the_batch_allows():
    ids, mask = pad_left([[1] * 3, [2] * 5], 0, "cpu", multiple=16)
    trimmed, trimmed_mask = trim_left(ids, mask, multiple=8)
    assert trimmed.shape == (2, 8) and torch.equal(trimmed[:, -5:], ids[:, -5:])
    assert trim_left(ids, mask)[0].shape == (2, 5)
    narrow = pad_left([[1] * 3], 0, "cpu")
    assert trim_left(*narrow, multiple=8)[0].shape == (1, 3)  # never wider than the batch
    assert torch.equal(mask_positions(trimmed_mask)[:, -5:], mask_positions(mask)[:, -5:])
