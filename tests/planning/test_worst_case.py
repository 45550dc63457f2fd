"""istune.planning.worst_case: the worst-case selections and seeds a memory prediction or measurement uses."""

from istune.planning.worst_case import draw_schedule, worst_case_seed, worst_case_selections


def test_worst_case_selections_store_the_most_selected_blocks():
    assert worst_case_selections(6, 2) == [[0, 5]] == worst_case_selections(6, 2, 6)
    assert worst_case_selections(6, 2, 0) == [[0, 5]]  # nothing stored: layer 0's step is the worst
    assert worst_case_selections(6, 2, 3) == [[0, 5], [3, 5]]  # M >= N_u: every backward block stored
    assert worst_case_selections(8, 3, 1) == [[0, 6, 7], [5, 6, 7]]  # M < N_u: the top N_u selected
    assert worst_case_selections(8, 3, 2) == [[0, 6, 7], [5, 6, 7]]
    assert worst_case_selections(3, 3, 1) == [[0, 1, 2]]  # N_u = N_L: one candidate, not two alike


def test_worst_case_seed_is_the_first_that_draws_layer_0():
    seed, schedule = worst_case_seed("ist", 40, 1, 0, 2, unmeasured=1)
    assert any(0 in s for s in schedule) and schedule == draw_schedule("ist", 40, 1, seed, 3)[1:]
    assert all(not any(0 in s for s in draw_schedule("ist", 40, 1, earlier, 3)[1:])
               for earlier in range(seed))
