"""Helper modules shared by tests/unit and tests/e2e (pyproject puts tests/ on pytest's pythonpath): paths (ROOT,
PYTHON), train (real train.py / torchrun / status.py subprocesses), data, curriculum, checkpoint, status."""
