"""The learning: data loading, numpy models, training, tracking, plots, and the `src.train` entry point."""
