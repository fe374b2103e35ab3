"""The DVC data stages: download MNIST and preprocess it into data/processed/."""
