"""The model code: plain PyTorch modules and their configs (the math), importing nothing else of the package
but `files`."""
