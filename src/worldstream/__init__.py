"""worldstream: run LingBot-World and Wan video world models on the GPU you have."""
__version__ = "0.1.0"
