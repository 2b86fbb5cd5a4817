"""The character model and its files: the network (`network`), one checkpoint on disk (`checkpoint`) and the
versioned store that publishing and hot-swapping share (`versions`)."""
