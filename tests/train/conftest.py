from tests.data.conftest import based_cache, small_corpus, small_tokenizer  # noqa: F401  (shared)
