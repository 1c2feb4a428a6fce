"""lm-evaluation-harness adapter: the "based" model and the recall tasks shipped in based/eval/tasks/.

Plain `lm_eval --model based --tasks based_swde ...` works once based is installed: lm-eval (0.4.x)
has no plugin entry point, so based-lm-eval.pth runs based_lm_eval_plugin at start-up, which registers
this class lazily and adds TASKS_DIR to lm-eval's task paths. The wrapper below does the same explicitly
(for interpreters started without site .pth files) and then runs lm-eval's own CLI:

    based-lm-eval --model based --model_args pretrained=DIR --tasks based_swde \
        --metadata '{"swde_path": "swde.jsonl"}'          # or: python -m based.eval.harness ...

From Python, importing this module registers the model for lm_eval.simple_evaluate(model="based", ...).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from . import checkpoint
from .recall import generate_until

TASKS_DIR = Path(__file__).parent / "tasks"
log = logging.getLogger(__name__)


@register_model("based")
class BasedLM(TemplateLM):
    """A BASED checkpoint (or any Hugging Face causal LM) under lm-eval.

    loglikelihood and loglikelihood_rolling score right-padded batches in one forward pass (a causal
    model cannot see the padding); generate_until runs `model.generate` on left-padded batches, which
    decodes through the model's recurrent state.

    Args:
        pretrained: a checkpoint directory (with its tokenizer) or a model instance.
        tokenizer: a tokenizer directory or instance (default: the checkpoint's).
        batch_size: requests per forward pass or generate call, or "auto" ("auto:N" is read as "auto"): the
            largest that runs, found like lm-eval's HFLM does, from max_batch_size down, halving on
            out-of-memory, with a probe forward at the longest input of each call (see _detect_batch_size).
        max_batch_size: where "auto" starts (default 64).
        max_length: longest input in tokens; longer contexts keep their last tokens.
        device, dtype: where and in what precision to run ("auto": bf16 on CUDA, fp32 on CPU).
        max_gen_toks: default generation budget when a task sets none.
    """

    def __init__(
        self, pretrained, tokenizer=None, batch_size: int | str = 1, max_length: int = 2048,
        device: str | None = None, dtype: str | torch.dtype = "auto", max_gen_toks: int = 256,
        max_batch_size: int | None = 64, **unused,
    ):
        super().__init__()
        unused = {k: v for k, v in unused.items() if v is not None}
        if unused:
            log.warning("based: ignoring model arguments %s", sorted(unused))
        if device and device.startswith("cuda") and not torch.cuda.is_available():
            log.warning("based: CUDA is not available, running on the CPU")
            device = "cpu"
        if isinstance(pretrained, (str, Path)):
            self.model, self.tokenizer = checkpoint.load_checkpoint(pretrained, tokenizer, device, dtype)
        else:
            if tokenizer is None:
                raise ValueError("pass the tokenizer with a model instance")
            self.model = pretrained.eval()
            self.tokenizer = checkpoint.load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
        if self.tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos token, which lm-eval uses as the prefix of empty contexts")
        self._device = next(self.model.parameters()).device
        self.auto_batch_size = str(batch_size).split(":")[0] == "auto"
        if not self.auto_batch_size and (not str(batch_size).isdigit() or int(batch_size) < 1):
            raise ValueError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}")
        max_batch_size = 64 if max_batch_size is None else max_batch_size
        if not str(max_batch_size).isdigit() or int(max_batch_size) < 1:
            raise ValueError(f"max_batch_size must be a positive integer, got {max_batch_size!r}")
        self.max_batch_size = int(max_batch_size)
        self.batch_size = "auto" if self.auto_batch_size else int(batch_size)
        self.batch_sizes: dict[int, int] = {}  # probe length -> batch size found ("auto"; lm-eval reports them)
        self._max_length = int(max_length)
        self.max_gen_toks = int(max_gen_toks)

    def _batch_size_for(self, length: int) -> int:
        """The fixed batch size, or with "auto" the one found for inputs of up to `length` tokens."""
        if not self.auto_batch_size:
            return self.batch_size
        fits = [size for probed, size in self.batch_sizes.items() if probed >= length]
        if fits:
            return min(fits)
        self.batch_sizes[length] = self._detect_batch_size(length)
        log.info("based: batch_size auto -> %d for inputs of %d tokens", self.batch_sizes[length], length)
        return self.batch_sizes[length]

    @torch.no_grad()
    def _detect_batch_size(self, length: int) -> int:
        """The largest batch from max_batch_size down (halving) whose forward over `length` tokens, logits
        and log-softmax included, runs without running out of memory. That forward costs more than
        generate (which keeps only the last position's logits and a constant-size state), so its size
        serves generate_until too. On the CPU, where running out of memory can kill the process instead of
        raising, sizes whose logits alone would take over a quarter of the free memory are not tried."""
        from ..generation.state import free_memory_bytes

        size = self.max_batch_size
        free = free_memory_bytes(self._device) if self._device.type == "cpu" else None
        if free is not None:
            per_row = length * self.model.config.vocab_size * 4 * 2  # fp32 logits and their log-softmax
            size = max(1, min(size, free // (4 * per_row)))
        while True:
            try:
                batch = torch.zeros(size, length, dtype=torch.long, device=self._device)
                F.log_softmax(self.model(batch).logits.float(), dim=-1)
                return size
            except (torch.OutOfMemoryError, MemoryError) as e:
                if size == 1:
                    raise ValueError(
                        f"batch_size auto: one sequence of {length} tokens does not fit in memory ({e}): lower max_length"
                    ) from None
                size //= 2
                if self._device.type == "cuda":
                    torch.cuda.empty_cache()

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tokenizer.decode(tokens, **kwargs)

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: (cache key, context ids, continuation ids) -> (log p(continuation | context), is greedy)."""
        too_long = next((len(r[2]) for r in requests if len(r[2]) > self.max_length), None)
        if too_long:
            raise ValueError(f"a continuation of {too_long} tokens does not fit max_length={self.max_length}")
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: len(requests[i][1]) + len(requests[i][2]), reverse=True)
        if not order:
            return []
        longest = requests[order[0]]
        batch_size = self._batch_size_for(min(len(longest[1]) + len(longest[2]) - 1, self.max_length))
        for start in tqdm(range(0, len(order), batch_size), desc="loglikelihood", disable=disable_tqdm):
            rows = order[start : start + batch_size]
            # Feed context + continuation minus its last token, at most max_length tokens.
            inputs = [(requests[i][1] + requests[i][2])[-(self.max_length + 1) : -1] for i in rows]
            T = max(len(x) for x in inputs)
            batch = torch.zeros(len(rows), T, dtype=torch.long)
            for r, x in enumerate(inputs):
                batch[r, : len(x)] = torch.tensor(x)
            logits = self.model(batch.to(self._device)).logits
            for r, i in enumerate(rows):
                key, _, cont = requests[i]
                n = len(inputs[r])
                logprobs = F.log_softmax(logits[r, n - len(cont) : n].float(), dim=-1)  # [len(cont), V]
                target = torch.tensor(cont, device=logprobs.device)
                result = (
                    logprobs.gather(-1, target[:, None]).sum().item(),
                    bool((logprobs.argmax(-1) == target).all()),
                )
                out[i] = result
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts: disjoint windows of max_length tokens, the first conditioned on EOS."""
        windows, owner = [], []
        for j, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                self.tok_encode(text), self.prefix_token_id, self.max_length, context_len=1
            )):
                windows.append((None, ctx, cont))
                owner.append(j)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for j, (ll, _) in zip(owner, scores):
            totals[j] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Batched generation, grouped by generation settings; each text is cut before its first stop string."""
        eos = self.tokenizer.decode([self.eot_token_id])
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        out: list[str | None] = [None] * len(requests)
        for rows in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[rows[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = kwargs.pop("max_gen_toks")
            do_sample = bool(kwargs.get("do_sample"))
            sampling = {k: kwargs[k] for k in ("temperature", "top_p", "top_k") if do_sample and k in kwargs}
            prompts = [self.tok_encode(requests[i].args[0]) for i in rows]
            max_prompt = max(1, self.max_length - max_new)
            batch_size = self._batch_size_for(max(min(len(p), max_prompt) for p in prompts) + max_new)
            texts = generate_until(
                self.model, self.tokenizer, prompts, until, max_new, batch_size, max_prompt_tokens=max_prompt,
                progress=not disable_tqdm, do_sample=do_sample, **sampling,
            )
            for i, (text, _) in zip(rows, texts):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out


def main(argv: list[str] | None = None) -> None:
    """lm-eval's CLI with the "based" model registered and --include_path defaulting to our tasks."""
    import sys

    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    saved = sys.argv
    if argv is not None:  # HarnessCLI parses sys.argv
        sys.argv = [sys.argv[0], *argv]
    try:
        setup_logging()
        cli = HarnessCLI()
        args = cli.parse_args()
    finally:
        sys.argv = saved
    if getattr(args, "include_path", "") is None:
        args.include_path = str(TASKS_DIR)
    cli.execute(args)


if __name__ == "__main__":
    main()
