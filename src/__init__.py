"""The learning: data, numpy models, training, tracking, plots, and `python -m src.train`."""
