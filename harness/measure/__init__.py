"""What measures a step: memory meters (memory), timing and MFU (throughput), card budgets
(budget), and one measured run in its own process (worker)."""
