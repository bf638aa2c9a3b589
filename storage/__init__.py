"""The bank on disk: LMDB document records + Zarr tensors. No torch modules, no tokenizer."""
