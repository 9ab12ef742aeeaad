"""Training loops and the pieces they share (optimiser, schedule, checkpoints, resume state)."""
