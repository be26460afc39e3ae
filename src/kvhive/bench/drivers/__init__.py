"""Scripts the bench runs in OTHER interpreters (the lmcache client venv); never imported."""
