"""LongRoPE: the evolutionary factor search (``evolution``) and its run on a checkpoint (``checkpoint``)."""
