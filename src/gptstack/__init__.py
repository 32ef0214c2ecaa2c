"""gptstack: train a GPT assistant end to end, every stage measured against ground truth."""
__version__ = "0.1.0"
