"""Text and tokens: text sources (stdlib, files, datasets), tokenization, packing into blocks, PoSE positions."""
