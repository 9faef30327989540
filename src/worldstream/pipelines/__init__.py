"""The jobs: video generation end to end (tasks, prompts, conditioning, the sampling loop, MP4), built on the
runtime."""
