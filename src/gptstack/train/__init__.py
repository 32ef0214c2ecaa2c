"""The shared training core every stage runs on: optimizer and schedule, precision, distributed
wrapping, atomic resumable checkpoints, metrics and progress."""
