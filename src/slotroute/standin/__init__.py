"""Stand-in HTTP backend for demos and tests that imitates the model servers slotd supervises."""
