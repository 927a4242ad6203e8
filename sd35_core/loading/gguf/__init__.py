"""GGUF diffusion models: a memory-mapped reader, torch dequantizers, and the quantized-weight format.

Nothing here imports the ``gguf`` package (a test-only dependency that the tests check these modules
against). ``reader`` parses files, ``quant_types`` lists the GGML types, ``dequant`` turns blocks into
values, ``tensor`` is a weight kept in blocks, and ``sd3`` says what an SD3/SD3.5 GGUF is.
"""
