"""Run configurations (`--config=configs/<name>.py`)."""
