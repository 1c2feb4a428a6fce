from tests.data.conftest import based_cache, one_thread, small_corpus, small_tokenizer  # noqa: F401  (shared)
