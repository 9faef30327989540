"""Trainers. `world`: the small LingBot-World Cam model (and its VAE) trained on procedural worlds."""
