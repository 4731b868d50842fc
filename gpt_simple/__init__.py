"""gpt-simple: GPT pretraining where N short, interrupted jobs equal one long job."""
__version__ = "0.1.0"
