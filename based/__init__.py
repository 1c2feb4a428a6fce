"""based: BASED linear-attention language models (Arora et al., 2024)."""
__version__ = "0.1.0"
