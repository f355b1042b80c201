"""What predicts a step's memory without running it: from the shape alone (analytic) and the
real step traced under fake tensors (simulate); `harness predict` (command)."""
