"""One torch thread per test process: the suite's models are tiny, and on a small shared machine torch's thread
pool stalls whenever another process holds a core (seen here: 10-40x slower), which makes run times swing."""
import torch

torch.set_num_threads(1)
