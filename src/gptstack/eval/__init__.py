"""Evaluation: the shared protocol every policy stage reports through (protocol.py)."""
