"""Checkpoint formats: the files users have on disk, read safely, mapped to the models' names, and checked.

Sits between the runtime and the models: it knows file layouts (safetensors headers, `.pth` state dicts,
upstream vs diffusers key names, compressed checkpoints, variant detection from weight shapes) and builds
`models/` objects from them; it knows nothing of GPUs, streaming or pipelines.
"""
