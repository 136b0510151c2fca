"""orionlm as an lm-evaluation-harness model ("orionlm"): every lm-eval task runs on orionlm models.

lm-eval finds models in its registry, which this module fills on import, so:

    import orionlm.eval.harness  # registers "orionlm"
    lm_eval.simple_evaluate(model="orionlm", model_args="pretrained=runs/m", tasks=["hellaswag"])

or from the shell, `orionlm lm-eval --model orionlm --model_args pretrained=runs/m --tasks hellaswag`
(lm-eval's own command line, with the model registered first); a Hub id's revision is `pretrained=ID@REV` or, as
lm-eval's own models take it, `revision=REV`. Requests go through orionlm's scoring
(`orionlm.eval.scoring`, the same semantics as lm-eval's HF model) and generation engine.
"""

from __future__ import annotations

from typing import Any

from ..errors import require, with_revision
from ..generation import GenerationConfig, generate_ids
from ..loading import load_model
from .scoring import loglikelihood, perplexity, prefix_token

# lm-eval fills its built-in models only into an empty registry: they go in first
require("lm_eval.models", "harness", "orionlm's lm-evaluation-harness model")
from lm_eval.api.model import LM  # noqa: E402
from lm_eval.api.registry import register_model  # noqa: E402


@register_model("orionlm")
class OrionLMHarness(LM):
    def __init__(
        self, pretrained: str, device: str | None = None, batch_size: int | str = 16, max_gen_toks: int = 256,
        revision: str | None = None, **_: Any,
    ) -> None:  # fmt: skip
        super().__init__()
        self.model, tokenizer, _ = load_model(with_revision(pretrained, revision), device=device)
        if tokenizer is None:
            raise ValueError(f"{pretrained} has no tokenizer.json")
        self.tokenizer = tokenizer
        self.batch_size = 16 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_gen_toks = max_gen_toks

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [request.args for request in requests]
        scored = loglikelihood(self.model, self.tokenizer, pairs, self.batch_size, progress=not disable_tqdm)
        return [(s.logprob, s.greedy) for s in scored]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        return [-perplexity(self.model, self.tokenizer, [r.args[0]], progress=False).nll for r in requests]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy unless the task asks otherwise; each text ends before its first `until` string. Requests
        with the same settings run as one continuous batch."""
        groups: dict[tuple, list[int]] = {}
        jobs = []
        for i, request in enumerate(requests):
            context, settings = request.args
            settings = dict(settings)
            until = settings.get("until") or []
            max_new = int(settings.get("max_gen_toks", self.max_gen_toks))
            temperature = float(settings.get("temperature", 0.0))
            sample = bool(settings.get("do_sample", False)) and temperature > 0
            room = self.model.config.max_seq_len - max_new
            ids = self.tokenizer.encode(context, add_special_tokens=False)[-room:] or [prefix_token(self.tokenizer)]
            jobs.append((ids, [until] if isinstance(until, str) else list(until)))
            groups.setdefault((max_new, sample, temperature), []).append(i)
        outputs = [""] * len(requests)
        eos = [self.tokenizer.eos_id] if self.tokenizer.eos_id is not None else []
        for (max_new, sample, temperature), members in groups.items():
            config = GenerationConfig(max_new_tokens=max_new, do_sample=sample, temperature=temperature or 1.0,
                                      stop_token_ids=eos)  # fmt: skip
            generated = generate_ids(self.model, [jobs[i][0] for i in members], config=config)
            for i, tokens in zip(members, generated, strict=True):
                text = self.tokenizer.decode([t for t in tokens if t not in eos])
                for stop in jobs[i][1]:
                    text = text.split(stop)[0]
                outputs[i] = text
        return outputs
