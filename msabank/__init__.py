"""msabank: a versioned, crash-safe memory-bank database for Memory Sparse Attention (MSA) models."""

__version__ = "0.1.0"
