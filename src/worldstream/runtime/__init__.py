"""Running models on the machine you have: pinned host memory, block slabs, the streaming engine, the disk
tier, the planner, loading experts into their homes, the runner, compressed blocks and 8-bit attention."""
