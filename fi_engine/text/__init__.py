"""Text in and out (docs/engine-text.md): the tokenizer, the chat template, the generation config and incremental
detokenization, on the host (no GPU).

- :mod:`~fi_engine.text.codec`: ``TextCodec``, the facade the CLI and the servers use.
- :mod:`~fi_engine.text.tokenizer`: ``tokenizer.json`` and the special tokens; :mod:`~fi_engine.text.chat`: the chat
  template, rendered as transformers renders it; :mod:`~fi_engine.text.generation_config`: EOS ids and sampling
  defaults; :mod:`~fi_engine.text.detokenize`: incremental detokenization and stop strings;
  :mod:`~fi_engine.text.tool_calls`: the tool calls in a model's reply; :mod:`~fi_engine.text.harmony`: a gpt-oss
  reply's channels (answer, reasoning, calls).
- :mod:`~fi_engine.text.model_files`: the checkpoint's small files read with clear errors;
  :mod:`~fi_engine.text.optional`: ``tokenizers`` / ``jinja2`` imported on first use;
  :mod:`~fi_engine.text.args`: their argument checks.
"""

from typing import Any

__all__: list[str] = []


def __getattr__(name: str) -> Any:  # the old module fi_engine.text's names, for one release
    from ..moved import old_name

    return old_name(__name__, name)
