"""From logits to tokens: the sampler, the logits processing before it, and speculative decoding.

- :mod:`~fi_engine.runtime.sample.sampler`: ``Sampler``, each row's token from the LM head's float32 logits (greedy
  argmax, or top-k / top-p from a Philox stream, each request with its own parameters; the tokens shared between
  tensor-parallel ranks).
- :mod:`~fi_engine.runtime.sample.logits_processing`: ``LogitsProcessor``, the log-probabilities and the sampling
  controls (a grammar's mask, bias, penalties, ``min_tokens``, ``min_p``) of the rows that ask.
- :mod:`~fi_engine.runtime.sample.speculation`: speculative decoding's host side: the drafts (prompt lookup, a draft
  model), how many of a draft the model's choices accept, and the policy that says when a verifying pass pays.
"""

__all__: list[str] = []
