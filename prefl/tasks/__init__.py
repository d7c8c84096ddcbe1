"""Tasks: the embedded toy task and its exact optimum, in pure Python (nothing of prefl, no
torch), so that data, evaluation and tests can all draw on the same ground truth."""
