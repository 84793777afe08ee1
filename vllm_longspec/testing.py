"""Test-only proposer modes, switched on by an environment variable.

A randomly initialised draft is almost never accepted, so on its own it cannot
test multi-token acceptance. With

    VLLM_LONGSPEC_TEST_PROPOSER='{"replay": "/path/recorded.json", "corrupt_every": 3}'

the LongSpec proposer still runs the real draft every step (so the draft's
window cache, cross-attention and KV bookkeeping run exactly as in production)
but then replaces its proposals by the continuation recorded from a plain greedy
run (``{"sequences": [{"prompt_token_ids": [...], "output_token_ids": [...]}]}``):
every draft is accepted. With ``corrupt_every = m`` the draft for every output
index that is a multiple of m is replaced by a different token, forcing a
rejection at a varying position in the chain; a recorded sequence may carry
its own ``"corrupt_every"`` (one engine, several replay modes, told apart by
prompt). Proposals are deterministic
(no draft probabilities), which vLLM's rejection sampler treats losslessly.
A prompt may be recorded with several continuations (sampled requests): each
request replays the first one that agrees with the tokens it has produced so
far, e.g. the target's likeliest next token after each likely first token.
The variable is read in the worker process, where `patches/testing.py` installs
these modes around the proposer; production never sets it.

Trees (``override_tree``): the recorded continuation is put on one branch of
the drafted beam tree, keeping its shape: at each depth on a child of the
previous choice (one with children of its own, varying with the output index,
so accepted paths leave the first branch), until the tree ends or, with
``corrupt_every = m``, at an output index that is a multiple of m, where no
child gets it. No other child ever carries the recorded token, so each round
accepts exactly the chosen path. Greedy requests only.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch

from vllm_longspec.tree import BeamTree

ENV_VAR = "VLLM_LONGSPEC_TEST_PROPOSER"


@dataclasses.dataclass
class TestProposer:
    __test__ = False  # not a pytest class

    # prompt token ids -> recorded output token ids (one list per continuation)
    recorded: dict[tuple[int, ...], list[list[int]]]
    corrupt_every: int = 0
    # prompt token ids -> that prompt's own corrupt_every (overrides the above)
    corrupt_by_prompt: dict[tuple[int, ...], int] = dataclasses.field(
        default_factory=dict)

    @classmethod
    def from_env(cls) -> TestProposer | None:
        raw = os.environ.get(ENV_VAR)
        if not raw:
            return None
        options = json.loads(raw)
        with open(options["replay"]) as f:
            sequences = json.load(f)["sequences"]
        recorded: dict[tuple[int, ...], list[list[int]]] = {}
        corrupt_by_prompt: dict[tuple[int, ...], int] = {}
        for seq in sequences:
            prompt = tuple(seq["prompt_token_ids"])
            recorded.setdefault(prompt, []).append(list(seq["output_token_ids"]))
            if "corrupt_every" in seq:
                corrupt_by_prompt[prompt] = int(seq["corrupt_every"])
        return cls(recorded, int(options.get("corrupt_every", 0)), corrupt_by_prompt)

    def corrupt_period(self, state) -> int:
        """The corrupt_every that applies to ``state``'s prompt."""
        return self.corrupt_by_prompt.get(tuple(state.prompt_token_ids),
                                          self.corrupt_every)

    def continuation(self, state, bonus: int, bonus_token: int) -> list[int] | None:
        """The recorded outputs of ``state``'s prompt that agree with what the
        request has produced: its output tokens so far and ``bonus_token`` as
        output number ``bonus`` (LongSpec drafts before vLLM's bookkeeping, so
        the request's state does not hold this step's tokens yet). None:
        nothing recorded agrees."""
        produced = list(state.output_token_ids)
        for outputs in self.recorded.get(tuple(state.prompt_token_ids), ()):
            if (outputs[:len(produced)] == produced and 0 <= bonus < len(outputs)
                    and outputs[bonus] == bonus_token):
                return outputs
        return None

    def override(
        self,
        draft_token_ids: torch.Tensor,  # [num_reqs, K]
        runner,
        committed_lens: torch.Tensor,  # [num_reqs] position of each bonus token
        bonus_tokens: torch.Tensor,  # [num_reqs] each request's bonus token
    ) -> torch.Tensor:
        drafts = draft_token_ids.clone()
        num_reqs, num_drafts = drafts.shape
        vocab_size = runner.input_batch.vocab_size
        for i, req_id in enumerate(runner.input_batch.req_ids[:num_reqs]):
            state = runner.requests[req_id]
            # The bonus token is output number `bonus`; drafts follow it.
            bonus = int(committed_lens[i]) - len(state.prompt_token_ids)
            outputs = self.continuation(state, bonus, int(bonus_tokens[i]))
            if outputs is None:
                continue
            corrupt_every = self.corrupt_period(state)
            for k in range(num_drafts):
                index = bonus + 1 + k
                if index < 0 or index >= len(outputs):
                    continue
                token = outputs[index]
                if corrupt_every and index % corrupt_every == 0:
                    token = (token + 1) % vocab_size
                drafts[i, k] = token
        return drafts

    def override_tree(
        self,
        beam: BeamTree,
        runner,
        committed_lens: torch.Tensor,  # [num_reqs] position of each root
        root_tokens: torch.Tensor,  # [num_reqs] each tree's root (the bonus token)
    ) -> BeamTree:
        tree = beam.tree
        tokens = tree.tokens.clone()
        children = tree.children  # [B, N + 1, C] by slot, -1 padded
        vocab_size = runner.input_batch.vocab_size
        for i, req_id in enumerate(runner.input_batch.req_ids[: tree.batch_size]):
            state = runner.requests[req_id]
            # The root is output number `root`; depth d holds output root + d.
            root = int(committed_lens[i]) - len(state.prompt_token_ids)
            outputs = self.continuation(state, root, int(root_tokens[i]))
            if outputs is None:
                continue
            corrupt_every = self.corrupt_period(state)
            slot = 0
            for index in range(root + 1, len(outputs)):
                kids = [c for c in children[i, slot].tolist() if c >= 0]
                if index < 0 or not kids:
                    break
                token = outputs[index]
                for kid in kids:
                    if tokens[i, kid] == token:
                        tokens[i, kid] = (token + 1) % vocab_size
                if corrupt_every and index % corrupt_every == 0:
                    break
                parents = [k for k in kids if bool((children[i, k + 1] >= 0).any())]
                branches = parents or kids
                chosen = branches[index % len(branches)]
                tokens[i, chosen] = token
                slot = chosen + 1
        return dataclasses.replace(beam, tree=dataclasses.replace(tree, tokens=tokens))


RECORD_ENV_VAR = "VLLM_LONGSPEC_RECORD_DRAFTS"


@dataclasses.dataclass
class DraftRecorder:
    """Saves what the draft computed in its first drafting rounds (tests only).

    With ``VLLM_LONGSPEC_RECORD_DRAFTS='{"dir": "/path", "max_rounds": 8}'`` every
    ``propose`` call, up to ``max_rounds``, writes ``round-NNNN.pt`` holding the
    draft logits of each drafting step ([K, num_reqs, vocab]), the proposed
    tokens, each request's committed length (position of its bonus token) and
    prompt. The training-side draft must reproduce those logits (parity test).
    """

    __test__ = False

    directory: str
    max_rounds: int = 8
    rounds: int = 0

    @classmethod
    def from_env(cls) -> DraftRecorder | None:
        raw = os.environ.get(RECORD_ENV_VAR)
        if not raw:
            return None
        options = json.loads(raw)
        return cls(options["dir"], int(options.get("max_rounds", 8)))

    @property
    def active(self) -> bool:
        return self.rounds < self.max_rounds

    @staticmethod
    def capture(model) -> list[torch.Tensor]:
        """Wrap ``model.draft_logits`` until ``release``; returns the list it fills
        (one [num_rows, vocab] float32 copy per call, over the whole vocabulary:
        a chain's draft steps, or a tree's levels,
        ``tests/unit/test_tree_draft_parity.py``)."""
        captured: list[torch.Tensor] = []
        draft_logits = model.draft_logits

        def recording(hidden_states: torch.Tensor) -> torch.Tensor:
            logits = draft_logits(hidden_states)
            captured.append(model.vocabulary_logits(logits).detach().float().cpu().clone())
            return logits

        model.draft_logits = recording
        return captured

    @staticmethod
    def release(model) -> None:
        del model.draft_logits  # back to the class's method

    def save(self, logits: list[torch.Tensor], draft_token_ids: torch.Tensor,
             runner, committed_lens: torch.Tensor) -> None:
        num_reqs = draft_token_ids.shape[0]
        prompts = [list(runner.requests[req_id].prompt_token_ids)
                   for req_id in runner.input_batch.req_ids[:num_reqs]]
        torch.save({
            "logits": torch.stack(logits),
            "draft_token_ids": draft_token_ids.cpu().clone(),
            "committed_lens": committed_lens.cpu().clone(),
            "prompt_token_ids": prompts,
        }, os.path.join(self.directory, f"round-{self.rounds:04d}.pt"))
        self.rounds += 1
