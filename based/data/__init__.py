"""Data: corpora (corpus.py), tokenizers (tokenizer.py), packed token memmaps and batches (packed.py).

Submodules are imported where used, not here, so that `import based.data.X` stays cheap and modules
added beside them (mqar.py) need no edit of this file.
"""
