"""Training: recipes as data (`config.py`), the loop (`trainer.py`), processes and wrapping
(`distributed.py`), checkpoints (`checkpoint.py`), logs (`logs.py`), the `blip3 train` command (`cli.py`)."""
