"""The CPU generator-rewind fix, and the vLLM bug it works around (no engine)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from vllm_longspec.patches import cpu_generator_rewind


def _runner(discarded: list[bool], generators: dict[int, torch.Generator]):
    """The parts of a runner that sampling and its bookkeeping read first."""
    def sampler(logits, sampling_metadata):  # draws as vLLM's sampler does: per row
        return [torch.rand(4, generator=gen) for gen in generators.values()]

    batch = SimpleNamespace(num_reqs=len(discarded), generators=generators,
                            sampling_metadata=None,
                            update_async_output_token_ids=lambda: None)
    return SimpleNamespace(input_batch=batch, sampler=sampler,
                           discard_request_mask=SimpleNamespace(np=np.array(discarded)))


def _original(name: str):
    return getattr(cpu_generator_rewind, f"_orig_{name}") or getattr(GPUModelRunner, name)


def test_vllm_still_rewinds_cpu_generators_by_offset():
    """When this fails, vLLM no longer calls set_offset on CPU: drop the patch."""
    runner = _runner([True], {0: torch.Generator().manual_seed(1)})
    with pytest.raises(RuntimeError, match="does not use offset"):
        _original("_bookkeeping_sync")(runner, None, None, None, None, 0)


def test_a_discarded_draw_leaves_its_generator_as_it_was():
    cpu_generator_rewind.apply()
    discarded, kept = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    runner = _runner([True, False], {0: discarded, 1: kept})
    before_discarded, before_kept = discarded.get_state(), kept.get_state()
    GPUModelRunner._sample(runner, logits=None, spec_decode_metadata=None)
    assert torch.equal(discarded.get_state(), before_discarded)
    assert not torch.equal(kept.get_state(), before_kept)  # the kept row did draw


def test_bookkeeping_does_not_see_the_discarded_cpu_generators():
    cpu_generator_rewind.apply()
    generators = {0: torch.Generator().manual_seed(1), 1: torch.Generator().manual_seed(2)}
    runner = _runner([True, False], generators)
    assert cpu_generator_rewind.discarded_cpu_generators(runner) == {0: generators[0]}
    seen = []
    with cpu_generator_rewind.hidden_generators(generators, [0]):
        seen.append(dict(generators))
    assert seen == [{1: generators[1]}]
    assert set(generators) == {0, 1}  # put back afterwards
    # The wrapped bookkeeping gets past the rewind loop (the stub runner then
    # lacks what the rest of the method reads).
    with pytest.raises(AttributeError):
        GPUModelRunner._bookkeeping_sync(runner, None, None, None, None, 0)
