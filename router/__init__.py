"""Gate scoring, dispatch plans and expert maps: which expert each token goes to."""
