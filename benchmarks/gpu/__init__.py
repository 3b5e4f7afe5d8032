"""The seed's crossover on real engines on a GPU (see run.py)."""
