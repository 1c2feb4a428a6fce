"""Hugging Face `generate` on the recurrent path.

GenerationMixin calls forward once on the whole prompt and then once per new token. We hand it an
InferenceState as its cache (kwarg `cache` in recent 5.x, `past_key_values` in earlier ones such as 5.17), sized
from generate's own max length; the first forward prefills it (left padding handled by
based.generation.prefill), every later one is a single recurrent `step`. The model is stateful like
Mamba: no beam search or assisted decoding, which would have to rewind or reorder the state.
"""
from __future__ import annotations

import inspect

import torch
from transformers import GenerationMixin, LogitsProcessor, TemperatureLogitsWarper
from transformers.modeling_outputs import CausalLMOutputWithPast

from .engine import prefill
from .state import InferenceState, full_attention_limit

# The name under which generate keeps the cache in its model kwargs (renamed in transformers 5.x).
CACHE_KWARG = "cache" if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters \
    else "past_key_values"


class StableTemperature(LogitsProcessor):
    """transformers' TemperatureLogitsWarper without its overflow: scores / 1e-39 are +-inf in float32 and
    softmax then NaN ("probability tensor contains either inf, nan or element < 0"). As
    based.generation.sampling does, the row's best score is subtracted first and 1 / temperature capped at the
    dtype's largest value, so any temperature > 0 samples (a tiny one among the most likely tokens)."""

    def __init__(self, temperature: float):
        self.temperature = temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        finfo = torch.finfo(scores.dtype)
        best = scores.amax(-1, keepdim=True).clamp_min(finfo.min)  # a row of -inf stays -inf, not NaN
        return (scores - best) * min(1 / self.temperature, finfo.max)


class BasedGenerationMixin(GenerationMixin):
    """`generate` for BasedForCausalLM: greedy, sampling (temperature, top-k, top-p), eos and stopping
    criteria, per-sequence early stop and left-padded batches, all through one prefill and then one
    recurrent step per token."""

    _is_stateful = True

    def _get_logits_processor(self, *args, **kwargs):
        processors = super()._get_logits_processor(*args, **kwargs)
        for i, processor in enumerate(processors):
            if type(processor) is TemperatureLogitsWarper:
                processors[i] = StableTemperature(processor.temperature)
        return processors

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # Our state is not a DynamicCache of keys and values: _prepare_cache_for_generation makes it.
        return False

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs: dict, generation_mode, batch_size: int, max_cache_length: int,
        *args, **kwargs,
    ) -> None:
        if generation_config.num_beams > 1:
            raise ValueError(
                "beam search is not supported: the recurrent state cannot be reordered between beams; "
                "use greedy decoding or sampling (num_beams=1)"
            )
        if model_kwargs.get(CACHE_KWARG) is not None or generation_config.use_cache is False:
            return
        limit = full_attention_limit(self)
        # The last generated token is never fed back: positions 0 .. max_length - 2 are cached.
        if limit is not None and max_cache_length + 1 > limit:
            raise ValueError(
                f"prompt + max_new_tokens = {max_cache_length + 1} tokens exceeds this model's "
                f"max_position_embeddings={limit} (full attention): lower max_new_tokens or shorten the prompt"
            )
        batch_size *= generation_config.num_return_sequences or 1
        model_kwargs[CACHE_KWARG] = InferenceState.allocate(self, batch_size, max_seq_len=max_cache_length + 1)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        cache: InferenceState | None = None,
        past_key_values: InferenceState | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> dict:
        cache = cache if cache is not None else past_key_values
        if cache is None:  # use_cache=False: the whole sequence again, every token
            return {"input_ids": input_ids, "attention_mask": attention_mask}
        # Only the columns the state has not seen: the prompt first, then one token a call.
        return {"input_ids": input_ids[:, cache.columns :], "cache": cache, "attention_mask": attention_mask}

    @torch.no_grad()
    def forward_with_cache(
        self, input_ids: torch.Tensor, cache: InferenceState, attention_mask: torch.Tensor | None = None,
        return_dict: bool | None = None,
    ) -> CausalLMOutputWithPast | tuple:
        """Advance `cache` over input_ids [B, T]; logits of the last position only, [B, 1, vocab_size], and
        the cache itself (transformers' convention: the output's cache goes into the next call).

        First call: prefill (attention_mask gives left padding). Later calls: T = 1 is one recurrent
        step; T > 1 continues every sequence over T more real tokens."""
        T = input_ids.shape[1]
        if cache.columns == 0:
            logits = prefill(self, cache, input_ids, attention_mask)
        elif T == 1:
            logits = self.step(input_ids.to(cache.device), cache.layers, cache.seqlen_offset)
            cache.seqlen_offset += 1
        else:
            hidden = self.transformer(
                input_ids.to(cache.device), state=cache.layers, seqlen_offset=cache.seqlen_offset.clone(),
                return_dict=False,
            )[0]
            cache.seqlen_offset += T
            logits = self._logits(hidden[:, -1])
        cache.columns += T
        logits = logits.unsqueeze(1)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        out = CausalLMOutputWithPast(logits=logits, **{CACHE_KWARG: cache})
        return out if return_dict else out.to_tuple()

    @staticmethod
    def check_no_padding(attention_mask: torch.Tensor | None) -> None:
        """The parallel forward treats every token as real: padding is handled only with a cache."""
        if attention_mask is not None and not bool(attention_mask.to(torch.bool).all()):
            raise ValueError(
                "forward() without a cache does not mask padding: use model.generate() or "
                "based.generation.prefill for left-padded batches"
            )
