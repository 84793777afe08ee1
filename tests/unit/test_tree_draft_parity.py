"""Tree drafting computes the training model's logits, level by level (no engine).

``TreeDrafter`` (the vLLM draft ``LongSpecForCausalLM``, its tree
self-attention over the window cache and the node's ancestors, its
cross-attention through vLLM's CPU kernel over the target's paged cache) grows
a batch's trees here against caches written in the test with vLLM's own
``cpu_attn_reshape_and_cache``. The training-side ``LongSpecDraft`` with the
same weights, fed the committed tokens and the node's path, must give every
node at depth d the same logits at position root + d with noise shift d + 1
(the node sees the target's K/V up to root - 1, the last committed position).
An off-by-one discriminator pins that correspondence: the training model with
shift d or d + 2, or with the node at position root + d - 1 or root + d + 1,
must fit every node clearly worse. The root's logits (the chain's first pass,
covered by ``tests/e2e/test_train_parity.py``) are the training model's.

The draft's K/V for the committed tokens (what the first pass writes to the
window cache) are computed from the training model's projections, so nothing
of the vLLM draft enters the expected values.
"""

from __future__ import annotations

import dataclasses
import tempfile

import pytest
import torch

WINDOW = 40
BLOCK_SIZE = 32
# The deepest tree the trained noise shifts 1..4 allow: levels 1-3 are drafted
# with shifts 2-4 (the root's logits use shift 1, the last level is not drafted
# from). Widths vary so that nodes have 0, 1 or several children.
WIDTHS = (2, 3, 3, 2)
# Positions of the roots: shorter than the window, across it, beyond it.
ROOTS = (9, 50, 100)
# Tokens beyond each root that the target cache holds (rejected drafts of the
# last round): the draft must not see them.
STALE_TARGET_TOKENS = 3
TARGET_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "hidden_size": 384, "intermediate_size": 512, "num_attention_heads": 6,
    "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 320,
    "num_hidden_layers": 1, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "tie_word_embeddings": False,
}


def _draft_state(seed: int) -> dict[str, torch.Tensor]:
    """Random draft weights with non-trivial biases and norms (std 0.1 writers, as
    in the chain parity test, so both attentions visibly move the logits)."""
    from vllm_longspec.model.checkpoint import random_draft_state

    gen = torch.Generator().manual_seed(seed + 1)
    state = random_draft_state(TARGET_CONFIG, seed=seed, std=0.1)
    for name, tensor in state.items():
        if name.endswith(".bias"):
            state[name] = 0.1 * torch.randn(tensor.shape, generator=gen)
        elif name.endswith("layernorm.weight"):
            state[name] = 1 + 0.1 * torch.randn(tensor.shape, generator=gen)
    return state


@dataclasses.dataclass
class VllmDraft:
    model: torch.nn.Module  # LongSpecForCausalLM, bound to embed_weight / lm_head_weight
    embed_weight: torch.Tensor  # [V, hidden]
    lm_head_weight: torch.Tensor  # [V, hidden]


@pytest.fixture(scope="module")
def vllm_draft(tmp_path_factory):
    """The vLLM draft built as the proposer's engine would, in this process
    (tensor parallel world of one), with random target embedding and LM head."""
    from transformers import LlamaConfig
    from vllm.config import ModelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state
    from vllm.model_executor.layers.vocab_parallel_embedding import (
        ParallelLMHead,
        VocabParallelEmbedding,
    )
    from vllm.model_executor.model_loader.utils import process_weights_after_loading

    from vllm_longspec.config import LongSpecConfig, LongSpecSettings
    from vllm_longspec.model.draft import LongSpecForCausalLM

    if parallel_state.model_parallel_is_initialized():
        pytest.fail("another test left vLLM's model parallel groups initialised")
    target_dir = tmp_path_factory.mktemp("tiny_target")
    LlamaConfig(**TARGET_CONFIG).save_pretrained(target_dir)
    model_config = ModelConfig(model=str(target_dir), dtype="float32",
                               skip_tokenizer_init=True)
    vllm_config = VllmConfig(model_config=model_config)
    LongSpecSettings(LongSpecConfig(model=str(target_dir), sliding_window=WINDOW,
                                    num_speculative_tokens=sum(WIDTHS), tree=WIDTHS),
                     draft_vocab_size=0).store(model_config.hf_config)
    gen = torch.Generator().manual_seed(7)
    vocab, hidden = TARGET_CONFIG["vocab_size"], TARGET_CONFIG["hidden_size"]
    with set_current_vllm_config(vllm_config):
        parallel_state.init_distributed_environment(
            world_size=1, rank=0, local_rank=0, backend="gloo",
            distributed_init_method=f"file://{tempfile.mktemp(dir=target_dir)}")
        parallel_state.initialize_model_parallel(1, 1)
        try:
            model = LongSpecForCausalLM(vllm_config=vllm_config, prefix="draft")
            embed = VocabParallelEmbedding(vocab, hidden)
            lm_head = ParallelLMHead(vocab, hidden)
            with torch.no_grad():
                embed.weight.copy_(torch.randn(vocab, hidden, generator=gen))
                lm_head.weight.copy_(torch.randn(vocab, hidden, generator=gen) * 0.1)
            model.load_weights(_draft_state(seed=3).items())
            for module in (model, embed, lm_head):  # as vLLM's loader does
                process_weights_after_loading(module, model_config, torch.device("cpu"))
            model.bind_target(embed, lm_head)
            yield VllmDraft(model.eval(), embed.weight.detach(), lm_head.weight.detach())
        finally:
            parallel_state.destroy_model_parallel()
            parallel_state.destroy_distributed_environment()


class TrainingSide:
    """The training-side draft with the same weights; float32."""

    def __init__(self, embed_weight, lm_head_weight):
        from vllm_longspec.train.model import LongSpecDraft

        self.draft = LongSpecDraft(TARGET_CONFIG, sliding_window=WINDOW).eval()
        self.draft.load_state_dict(_draft_state(seed=3))
        self.embed_weight = embed_weight
        self.lm_head_weight = lm_head_weight

    @torch.no_grad()
    def window_kv(self, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Self-attention K/V [n, kv_heads, head] of tokens at positions 0..n-1."""
        from vllm_longspec.train.rope import apply_rope, rope_cos_sin

        attention = self.draft.self_attn
        hidden = self.draft.input_layernorm(self.embed_weight[torch.tensor([tokens])])
        cos, sin = rope_cos_sin(torch.arange(len(tokens))[None], self.draft.inv_freq,
                                self.draft.attention_scaling)
        # [1, kv_heads, n, head]
        keys = apply_rope(attention.k_proj(hidden).view(1, len(tokens), -1, 64)
                          .transpose(1, 2), cos, sin)
        values = attention.v_proj(hidden).view(1, len(tokens), -1, 64).transpose(1, 2)
        return keys[0].transpose(0, 1), values[0].transpose(0, 1)

    @torch.no_grad()
    def logits(self, tokens: list[int], target_keys, target_values, shift: int,
               last_position: int | None = None) -> torch.Tensor:
        """[V] logits of the last token; ``last_position`` moves that token only.
        target_keys/values: [kv_heads, >= len(tokens), head]."""
        n = len(tokens)
        positions = torch.arange(n)
        if last_position is not None:
            positions[-1] = last_position
        hidden = self.draft(self.embed_weight[torch.tensor([tokens])], positions[None],
                            target_keys[None, :, :n], target_values[None, :, :n], shift)
        return hidden[0, -1] @ self.lm_head_weight.T


class PagedCaches:
    """Per request, the target's last-layer K/V and the draft's window K/V, written
    by vLLM into CPU caches under shuffled block tables of their own."""

    def __init__(self, target_kv, window_kv, gen):
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        from vllm_longspec.attention.kv_cache import split_kv_cache

        kv_heads, head = TARGET_CONFIG["num_key_value_heads"], TARGET_CONFIG["head_dim"]
        self.isa = _get_attn_isa(torch.float32, BLOCK_SIZE, head)
        self.target_cache, self.target_block_table = self._write(target_kv, gen)
        self.window_cache, self.window_block_table = self._write(window_kv, gen)
        self.target_keys, self.target_values = split_kv_cache(self.target_cache, "cpu")
        assert self.target_keys.shape[1:] == (kv_heads, BLOCK_SIZE, head)

    def _write(self, kv_per_request, gen):
        from vllm import _custom_ops as ops

        from vllm_longspec.attention.kv_cache import split_kv_cache

        blocks = [-(-len(keys) // BLOCK_SIZE) for keys, _ in kv_per_request]
        num_blocks = sum(blocks) + 2
        order = torch.randperm(num_blocks - 1, generator=gen) + 1  # block 0 unused
        block_table = torch.zeros(len(blocks), max(blocks) + 1, dtype=torch.int32)
        _, kv_heads, head = kv_per_request[0][0].shape
        cache = torch.zeros(num_blocks, kv_heads, BLOCK_SIZE, 2 * head)
        key_half, value_half = split_kv_cache(cache, "cpu")
        start = 0
        for b, (keys, values) in enumerate(kv_per_request):
            block_table[b, :blocks[b]] = order[start:start + blocks[b]]
            start += blocks[b]
            pos = torch.arange(len(keys))
            slots = (block_table[b, pos // BLOCK_SIZE].long() * BLOCK_SIZE
                     + pos % BLOCK_SIZE)
            ops.cpu_attn_reshape_and_cache(keys.contiguous(), values.contiguous(),
                                           key_half, value_half, slots, self.isa)
        return cache, block_table


def _paths(tree, b: int) -> list[list[int]]:
    """Per node of request b: its path's node indices, root's child first."""
    parents = tree.parents[b].tolist()
    paths: list[list[int]] = []
    for node, parent in enumerate(parents):
        paths.append((paths[parent] if parent >= 0 else []) + [node])
    return paths


@pytest.fixture(scope="module")
def drafted(vllm_draft):
    """One round's trees drafted by TreeDrafter, with the logits of each level."""
    from types import SimpleNamespace

    from vllm_longspec.model.draft_inputs import CrossAttentionInputs
    from vllm_longspec.runner.tree_drafter import TreeDrafter
    from vllm_longspec.testing import DraftRecorder
    from vllm_longspec.tree import BatchSampling

    gen = torch.Generator().manual_seed(11)
    training = TrainingSide(vllm_draft.embed_weight, vllm_draft.lm_head_weight)
    vocab, kv_heads = TARGET_CONFIG["vocab_size"], TARGET_CONFIG["num_key_value_heads"]
    head, depth = TARGET_CONFIG["head_dim"], len(WIDTHS)
    # committed tokens 0..root (the root is the bonus token, not in the target cache)
    sequences = [torch.randint(vocab, (root + 1,), generator=gen).tolist()
                 for root in ROOTS]
    # the target's K/V for every position a node (or a wrong shift) might read
    target_kv = [(torch.randn(kv_heads, root + depth + 1, head, generator=gen),
                  torch.randn(kv_heads, root + depth + 1, head, generator=gen))
                 for root in ROOTS]
    caches = PagedCaches(
        [(k[:, :root + STALE_TARGET_TOKENS].transpose(0, 1),
          v[:, :root + STALE_TARGET_TOKENS].transpose(0, 1))
         for (k, v), root in zip(target_kv, ROOTS, strict=True)],
        [training.window_kv(tokens) for tokens in sequences], gen)
    root_logits = torch.stack([
        training.logits(tokens, k, v, shift=1)
        for tokens, (k, v) in zip(sequences, target_kv, strict=True)])

    inputs = CrossAttentionInputs(
        target_key_cache=caches.target_keys, target_value_cache=caches.target_values,
        block_table=caches.target_block_table,
        committed_lens=torch.tensor(ROOTS, dtype=torch.int32), cpu_isa=caches.isa)
    window_layer = SimpleNamespace(kv_cache=caches.window_cache, isa=caches.isa)
    drafter = TreeDrafter(vllm_draft.model, WIDTHS, window_layer)
    sampling = BatchSampling(torch.tensor([0.0, 1.0, 0.0]))  # one request samples
    torch.manual_seed(0)  # the sampled row's Gumbel noise
    captured = DraftRecorder.capture(vllm_draft.model)
    try:
        beam = drafter.draft(root_logits, inputs, caches.window_block_table, sampling)
    finally:
        DraftRecorder.release(vllm_draft.model)
    return training, sequences, target_kv, beam.tree, captured


def test_every_drafted_level_is_recorded(drafted):
    _, _, _, tree, captured = drafted
    assert [tuple(level.shape) for level in captured] == [
        (len(ROOTS) * width, TARGET_CONFIG["vocab_size"]) for width in WIDTHS[:-1]]
    assert tree.depths[0].tolist() == [d for d, w in enumerate(WIDTHS, 1) for _ in range(w)]


def test_tree_levels_match_training_model(drafted):
    training, sequences, target_kv, tree, captured = drafted
    errors, neighbour_errors = [], []
    for b, root in enumerate(ROOTS):
        keys, values = target_kv[b]
        paths = _paths(tree, b)
        first_node = 0
        for depth, width in enumerate(WIDTHS[:-1], start=1):
            # [B, W, V] the draft's logits at this level's nodes
            level_logits = captured[depth - 1].view(len(ROOTS), width, -1)
            for j in range(width):
                path = paths[first_node + j]
                assert len(path) == depth
                tokens = sequences[b] + tree.tokens[b, path].tolist()
                got = level_logits[b, j]
                scale = got.abs().max()
                # (shift, position of the node): the right one, then its neighbours
                variants = [(depth + 1, root + depth), (depth, root + depth),
                            (depth + 2, root + depth), (depth + 1, root + depth - 1),
                            (depth + 1, root + depth + 1)]
                error = [float((got - training.logits(tokens, keys, values, shift,
                                                      position)).abs().max() / scale)
                         for shift, position in variants]
                errors.append(error[0])
                neighbour_errors.append(min(error[1:]))
            first_node += width
    print(f"relative logit error: max {max(errors):.2e}; "
          f"nearest off-by-one: min {min(neighbour_errors):.2e}")
    assert max(errors) < 1e-4
    assert all(e < 0.5 * n for e, n in zip(errors, neighbour_errors, strict=True))


def test_window_only_round_runs_self_attention_alone(vllm_draft, monkeypatch):
    """A round that proposes nothing (``DraftRound(window_only=True)``: the
    policy chose K = 0 for every request) runs the draft's self-attention, which
    writes the window's K/V, and nothing else: no cross-attention over the
    target's cache, no MLP, no row output kept. A normal round's first pass
    runs both on its sampled rows."""
    from vllm_longspec.model.draft_inputs import CrossAttentionInputs, DraftRound

    model = vllm_draft.model
    calls = []
    monkeypatch.setattr(model.self_attn, "forward",
                        lambda positions, hidden, level=None: calls.append("self") or hidden)
    monkeypatch.setattr(model.cross_attn, "forward",
                        lambda positions, hidden, *args: calls.append("cross") or hidden)
    cross = CrossAttentionInputs(torch.empty(0), torch.empty(0),
                                 torch.zeros(2, 1, dtype=torch.int32),
                                 torch.ones(2, dtype=torch.int32), None)
    tokens, positions = torch.tensor([5, 6, 7]), torch.tensor([10, 11, 4])
    embedded = vllm_draft.embed_weight[tokens]
    with torch.no_grad():
        # the residual of self-attention, stubbed as the identity
        after_self = embedded + model.input_layernorm(embedded.clone())
        window_round = DraftRound(cross, window_only=True)
        with window_round.open():
            window_round.sample_first_pass_at(torch.tensor([1, 2]))
            out = model(tokens, positions)
        assert calls == ["self"]
        torch.testing.assert_close(out, after_self)  # and nothing more
        assert window_round.first_pass_output is None

        calls.clear()
        full_round = DraftRound(cross)
        with full_round.open():
            full_round.sample_first_pass_at(torch.tensor([1, 2]))
            out = model(tokens, positions)
        assert calls == ["self", "cross"]
        assert full_round.first_pass_output.shape == (2, embedded.shape[1])
        torch.testing.assert_close(out[0], after_self[0])  # not a sampled row
        assert not torch.allclose(out[1:], after_self[1:])


def test_window_write_stores_the_training_models_keys_and_values(vllm_draft, monkeypatch):
    """``write_window`` (a round that drafts nothing: only the step's K/V into
    the window cache, no attention) stores at each token's slot the training
    model's self-attention K/V for that token and position, exactly what the
    tree levels and the next chain round read: the cache equals one that
    vLLM's own cache write filled with the training model's K/V at the same
    slots of a shuffled block table (untouched slots stay zero in both)."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from vllm_longspec.attention.kv_cache import split_kv_cache

    gen = torch.Generator().manual_seed(5)
    training = TrainingSide(vllm_draft.embed_weight, vllm_draft.lm_head_weight)
    kv_heads, head = TARGET_CONFIG["num_key_value_heads"], TARGET_CONFIG["head_dim"]
    isa = _get_attn_isa(torch.float32, BLOCK_SIZE, head)
    num_tokens, num_blocks = 70, 5
    tokens = torch.randint(TARGET_CONFIG["vocab_size"], (num_tokens,), generator=gen)
    keys, values = training.window_kv(tokens.tolist())  # [n, kv_heads, head]
    block_table = torch.randperm(num_blocks, generator=gen)[:3]
    # the last 45 tokens, as one step's target tokens at positions 25..69
    positions = torch.arange(25, num_tokens)
    slots = block_table[positions // BLOCK_SIZE] * BLOCK_SIZE + positions % BLOCK_SIZE
    expected = torch.zeros(num_blocks, kv_heads, BLOCK_SIZE, 2 * head)
    ops.cpu_attn_reshape_and_cache(keys[positions].contiguous(),
                                   values[positions].contiguous(),
                                   *split_kv_cache(expected, "cpu"), slots, isa)
    cache = torch.zeros_like(expected)
    attn = vllm_draft.model.self_attn.attn
    monkeypatch.setattr(attn, "kv_cache", cache, raising=False)
    monkeypatch.setattr(attn, "isa", isa, raising=False)
    with torch.no_grad():
        vllm_draft.model.write_window(tokens[positions], positions, slots)
    assert cache.abs().sum() > 0
    torch.testing.assert_close(cache, expected)
