"""`gptstack serve RUN`: chat with a run's models, compare two stages, and rank sampled responses
in the browser; the rankings go to RUN/feedback.sqlite, which `gptstack rm --prefs` trains on.

app.py (FastAPI app + uvicorn), store.py (the SQLite store and its readers), static/ (the page).
Importing this package imports neither FastAPI nor torch (config.py reads serve.config).
"""
