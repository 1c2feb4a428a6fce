"""Generation: per-slot inference state, prefill then one-token recurrent decode, sampling without host
syncs, a CUDA-graph decode step, and Hugging Face `generate` on top (hf.py).

    from based.generation import generate, SamplingParams
    new_tokens = generate(model, input_ids, max_new_tokens=64, sampling=SamplingParams(0.8, top_p=0.95))
"""
from .engine import Decoder, generate, prefill, prompt_lengths, stream
from .sampling import SamplingParams, sample
from .state import InferenceState, check_lengths

__all__ = [
    "InferenceState", "Decoder", "prefill", "stream", "generate", "prompt_lengths", "check_lengths",
    "SamplingParams", "sample",
]
