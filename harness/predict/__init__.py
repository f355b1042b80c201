"""What predicts a step's memory without running it: from the shape alone (analytic) and the
real step traced under fake tensors (simulate), one prediction of either as a record (prediction:
`predict`), what fits a card (solve) and how many GPUs (gpus); `harness predict` (command) parses
and prints, and calls these."""
