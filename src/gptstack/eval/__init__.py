"""Evaluation: the protocol every policy stage reports through (protocol.py), graded problems and the
greedy evaluator (problems.py), every statistic (stats.py) and fit (fits.py) the stages compute."""
