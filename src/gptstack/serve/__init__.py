"""`gptstack serve RUN`: chat with a run's models, compare two stages, and rank sampled responses
in the browser; the rankings go to RUN/feedback.sqlite, which `gptstack rm --prefs` trains on.

app.py (FastAPI app + uvicorn) and static/ (the page); the label store is data/feedback.py.
Importing this package imports neither FastAPI nor torch (config.py reads serve.config).
"""
