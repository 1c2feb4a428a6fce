"""Shared fixtures: a byte-level BPE tokenizer built here, and tiny BASED checkpoints saved with it."""
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from based import BasedConfig, BasedForCausalLM

TEXT = [
    "The capital of France is Paris.\nThe capital of Italy is Rome.\n",
    "Name: Alice. Phone: 555-0100.\nName: Bob. Phone: 555-0199.\n",
    "<html><body><b>Title</b>: The Recall Tradeoff</body></html>\n",
]


def build_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style) trained on a few strings: covers every byte, no download."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TEXT * 8, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, tokenizer):
    """A random debug-preset model saved with its tokenizer."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt")
    model = BasedForCausalLM(BasedConfig.from_preset("debug", vocab_size=len(tokenizer)))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
