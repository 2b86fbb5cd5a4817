"""The choice after a model step: each row's bias (masks and repetition penalty), greedy, sampling and beam
search on tensors (`choice`), and the same choices as C kernels on a CPU (`kernels`, `_kernels.c`)."""
