"""The input's folded view (kvrepl/app/fold.py) as a function: when a line folds, what of it is
shown, where the cursor lands, and that every position maps both ways. tests/test_tmux.py sees it on
a real screen, with pastes of 6,000 and 20,000 characters."""

from __future__ import annotations

import pytest

from kvrepl.app.fold import plan_fold

WIDTH, ROWS, PROMPT = 80, 10, 2


def shown_columns(fold, n: int) -> int:
    first, second = fold.markers()
    return PROMPT + fold.head + len(first) + (fold.end - fold.start) + len(second)


def test_a_line_that_fits_is_not_folded():
    assert plan_fold([1] * (WIDTH * ROWS - PROMPT), 0, ROWS, WIDTH, PROMPT) is None
    assert plan_fold([], 0, ROWS, WIDTH, PROMPT) is None


@pytest.mark.parametrize("n", [WIDTH * ROWS, 6_000, 20_000])
def test_a_tall_line_shows_its_start_and_its_end_around_the_cursor_at_the_end(n):
    fold = plan_fold([1] * n, n, ROWS, WIDTH, PROMPT)
    assert fold is not None
    assert fold.head == WIDTH - PROMPT  # the prompt's row: the text's start beside it
    assert fold.end == n and fold.start > fold.head  # the end, with the cursor
    first, second = fold.markers()
    assert first == f" … {fold.start - fold.head:,} characters … " and second == ""
    assert shown_columns(fold, n) <= ROWS * WIDTH  # it fits
    assert fold.to_shown(n) == shown_columns(fold, n) - PROMPT  # the cursor after the last one


def test_a_cursor_in_the_middle_is_shown_with_a_marker_on_each_side():
    n = 20_000
    fold = plan_fold([1] * n, 9_000, ROWS, WIDTH, PROMPT)
    assert fold is not None and fold.head < fold.start <= 9_000 < fold.end < n
    assert all(fold.markers()) and shown_columns(fold, n) <= ROWS * WIDTH
    at = fold.to_shown(9_000)
    assert fold.to_line(at) == 9_000


def test_positions_map_both_ways_and_hidden_ones_land_on_their_marker():
    n = 5_000
    fold = plan_fold([1] * n, 0, ROWS, WIDTH, PROMPT)  # the cursor at the start
    assert fold is not None and fold.start == fold.head and fold.end < n
    for i in [*range(fold.head), *range(fold.start, fold.end + 1)]:
        assert fold.to_line(fold.to_shown(i)) == i
    marker_at = fold.to_shown(fold.end)
    assert fold.to_shown(n) == marker_at and fold.to_line(marker_at + 3) == fold.end


def test_wide_characters_count_their_columns():
    fold = plan_fold([2] * 3_000, 3_000, ROWS, WIDTH, PROMPT)  # e.g. CJK
    assert fold is not None
    assert fold.head == (WIDTH - PROMPT) // 2
    assert 2 * (fold.head + fold.end - fold.start) + PROMPT + len(fold.markers()[0]) <= ROWS * WIDTH
