"""Attention as one family: the ops and the plans, workspaces and variants they share.

- :mod:`.decode`, :mod:`.prefill`, :mod:`.mla`, :mod:`.sink`: the attention ops (batch decode, single and batch
  prefill over paged or ragged KV, multi-head latent attention, attention sinks); :mod:`.cascade`: merging the
  partial states of attention over several KV segments.
- :mod:`.plan`, :mod:`.plan_call`, :mod:`.plan_settings`: a batch's schedule, computed on the host and reused by
  every layer of a step, and the settings that select the kernel it is made for.
- :mod:`.workspace`: the device and pinned host buffers a plan lives in.
- :mod:`.host_index`: the host index arrays (indptr, indices, last-page lengths) a plan reads, checked.
- :mod:`.variants`: the kernel modules and URIs of each variant (head dims, dtypes, position encoding).
- :mod:`.attention_checks`: the checks the attention ops share.
"""
