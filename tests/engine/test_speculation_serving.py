"""Speculative decoding as the server reports it, on CPU: the draft tokens an engine verified and accepted travel as
``StepOutput.num_draft_tokens`` / ``num_accepted_tokens`` through an engine process and the service into
``/metrics`` (vLLM's ``spec_decode`` counters and their acceptance rate, summed over the API servers' slots). The
stand-in engine (helpers.fake_engine) reports a fixed verified draft with each output after a request's first."""

from __future__ import annotations

import pytest
from helpers.fake_engine import FakeStepEngine
from helpers.serve import WAIT

from fi_engine.serve.engine_process import EngineProcess
from fi_engine.serve.metrics import ServingMetrics
from fi_engine.serve.service import GenerationService

pytest.importorskip("tokenizers")


def samples(text: str) -> dict[str, float]:
    parser = pytest.importorskip("prometheus_client.parser")
    return {s.name: s.value for f in parser.text_string_to_metric_families(text) for s in f.samples if not s.labels}


def test_shared_metrics_sum_the_drafts_and_rate_the_sums() -> None:
    metrics = ServingMetrics.shared(2)
    metrics[0].speculation(4, 4)
    metrics[1].speculation(4, 1)
    metrics[1].speculation(3, 0)
    text = metrics[0].render()
    assert text == metrics[1].render()
    value = samples(text)
    assert value["fi_engine_spec_decode_num_drafts_total"] == 3
    assert value["fi_engine_spec_decode_num_draft_tokens_total"] == 11
    assert value["fi_engine_spec_decode_num_accepted_tokens_total"] == 5
    assert value["fi_engine_spec_decode_acceptance_rate"] == pytest.approx(5 / 11, rel=1e-12)
    assert metrics[1].speculation_counts == (2, 7, 1)  # its own slot
    assert samples(ServingMetrics().render())["fi_engine_spec_decode_acceptance_rate"] == 0.0


@pytest.mark.parametrize("process", [False, True])
def test_the_verified_drafts_reach_the_metrics(codec, pool, process) -> None:  # type: ignore[no-untyped-def]
    """Each output but a request's first reports a draft of 4 tokens, 3 accepted: 2 requests of 5 tokens give 8
    drafts, in the service's own process and through an engine process."""
    vocab = codec.tokenizer.vocab_size
    metrics = ServingMetrics()
    prompts = [[pool[(7 * i + j) % len(pool)] for j in range(6)] for i in range(2)]
    if process:
        engine = EngineProcess("helpers.fake_engine:FakeStepEngine", vocab, pool=pool, draft=(4, 3))
    else:
        engine = FakeStepEngine(vocab, pool=pool, draft=(4, 3))
    with engine, GenerationService(engine, codec, metrics=metrics) as service:
        results = [service.submit(p, max_new_tokens=5) for p in prompts]
        assert all(len(r.result(WAIT).token_ids) == 5 for r in results)
    assert metrics.speculation_counts == (8, 32, 24)
    value = samples(metrics.render())
    assert value["fi_engine_spec_decode_acceptance_rate"] == 0.75
