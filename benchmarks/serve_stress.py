"""Stress real ``vllm serve`` servers as their users would, and watch them hold.

    flock /tmp/engine.lock .venv/bin/python -m benchmarks.serve_stress            # issue 12's run
    flock /tmp/engine.lock .venv/bin/python -m benchmarks.serve_stress --quick    # a few minutes

For each server (``plain``; ``chain``: LongSpec chains; ``tree``: LongSpec
``"tree": true``; ``chain_fixed``: chains with ``"adaptive": false``, the
ablation of docs/compatibility.md's bf16 note) on the default target with the
shipped draft, ``--max-model-len 8192``, bf16 unless ``--dtype``, localhost only:

1. greedy *probe* prompts, each alone: fresh (uncached), then again (cached);
2. ``--rounds`` identical rounds, each:
   load: ``--streams`` streamed completions run to the end (greedy and sampled
   alternate, every other sampled one seeded) with ``--abort-streams`` more
   streams closed after ``--abort-after`` chunks and the probes (prefix-cache
   hits) all at once; the bad inputs (``stress/client.py``), each of which
   must get a 4xx; a seeded sampled request on a fresh (uncached) prompt of
   ``--seeded-len`` tokens (a chunked prefill) alone, then again in a batch;
   then, once the server is idle: memory (RSS/USS) per process, ``/metrics``,
   ``/health``, and the tracebacks the log gained;
3. the probes alone again, after all that traffic.

Bounded: every request has a timeout, no round starts after ``--time-limit-s``
per server. Writes ``results.json`` and ``results.md`` to ``--out``
(default ``benchmarks/results/serve_stress/``); server logs go to ``--log-dir``.
``--memory-probe`` runs the servers with ``stress/memprobe`` (tracemalloc,
live objects and tensors per round, written next to the logs; slow).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from benchmarks.longctx.machine import describe_machine, describe_software
from benchmarks.stress import client, memprobe_control, probes, report
from benchmarks.stress.prompts import PromptPool, tokenizer_for
from tests.e2e.server import vllm_server

REPOSITORY = Path(__file__).resolve().parents[1]
SHIPPED_DRAFT = REPOSITORY / "vllm_longspec" / "drafts" / "smollm2-135m-instruct"
SAMPLED = {"temperature": 0.8, "top_p": 0.95}
# Requests of the seeded phase's batch besides the seeded one.
SEEDED_COMPANIONS = 3
IDLE_WAIT_S = 120


@dataclass(frozen=True)
class StressSettings:
    servers: tuple[str, ...] = ("plain", "chain", "tree")
    dtype: str = "bfloat16"
    rounds: int = 10
    streams: int = 16
    abort_streams: int = 8
    abort_after: int = 3
    min_prompt_len: int = 1700
    max_prompt_len: int = 5800
    max_tokens: int = 64
    probes: int = 4
    probe_len: int = 1500
    probe_tokens: int = 48
    seeded_len: int = 5900
    max_model_len: int = 8192
    max_num_batched_tokens: int = 2048
    kv_cache_gib: float = 4.0
    k: int = 4
    draft: str = str(SHIPPED_DRAFT)
    time_limit_s: float = 1200.0
    memory_probe: bool = False

    def speculative_config(self, server: str) -> dict | None:
        chain = {"method": "longspec", "model": self.draft, "num_speculative_tokens": self.k}
        return {"plain": None, "chain": chain, "chain_fixed": {**chain, "adaptive": False},
                "tree": {"method": "longspec", "model": self.draft, "tree": True}}[server]


class Workload:
    """The requests of one run; the same for every server and every round."""

    def __init__(self, settings: StressSettings, pool: PromptPool, model: str):
        s = self.settings = settings
        self.model = model
        count = s.streams + s.abort_streams
        lengths = [s.min_prompt_len + (s.max_prompt_len - s.min_prompt_len) * i
                   // max(1, count - 1) for i in range(count)]
        self.stream_prompts = [pool.prompt(i, n) for i, n in enumerate(lengths)]
        self.probe_prompts = [pool.prompt(count + i, s.probe_len) for i in range(s.probes)]
        # Fresh prompts for the seeded phase: one per round, never sent before.
        first_seeded = count + s.probes
        self.seeded_prompts = [pool.prompt(first_seeded + r, s.seeded_len)
                               for r in range(s.rounds)]
        self.bad_inputs = client.bad_inputs(model, s.max_model_len, self.probe_prompts[0][:200])

    def stream_body(self, i: int) -> dict:
        body = {"model": self.model, "prompt": self.stream_prompts[i],
                "max_tokens": self.settings.max_tokens, "temperature": 0.0}
        if i % 2:
            body.update(SAMPLED, **({"seed": i} if i % 4 == 1 else {}))
        return body

    def probe_body(self, i: int) -> dict:
        return {"model": self.model, "prompt": self.probe_prompts[i], "temperature": 0.0,
                "max_tokens": self.settings.probe_tokens, "ignore_eos": True}

    def seeded_body(self, round_index: int) -> dict:
        return {"model": self.model, "prompt": self.seeded_prompts[round_index],
                "max_tokens": self.settings.probe_tokens, "seed": 1, **SAMPLED}


async def probe_pass(http: httpx.AsyncClient, base: str, work: Workload) -> list[dict]:
    """Each probe alone, one after the other."""
    return [(await client.complete(http, base, "probe", work.probe_body(i))).record(True)
            for i in range(len(work.probe_prompts))]


async def load_phase(http: httpx.AsyncClient, base: str, work: Workload) -> dict:
    s = work.settings
    started = time.perf_counter()
    outcomes = await client.gather(
        *(client.stream_completion(http, base, "stream", work.stream_body(i))
          for i in range(s.streams)),
        *(client.stream_completion(http, base, "abort", work.stream_body(s.streams + i),
                                   disconnect_after=s.abort_after)
          for i in range(s.abort_streams)),
        *(client.complete(http, base, "probe", work.probe_body(i))
          for i in range(s.probes)))
    seconds = time.perf_counter() - started
    tokens = sum(len(o.token_ids) for o in outcomes)
    probes_out = [o.record(True) for o in outcomes if o.kind == "probe"]
    return {"seconds": round(seconds, 2), "tokens": tokens,
            "tokens_per_s": round(tokens / seconds, 2),
            "requests": [o.record() for o in outcomes if o.kind != "probe"],
            "probes": probes_out}


async def seeded_phase(http: httpx.AsyncClient, base: str, work: Workload,
                       round_index: int) -> dict:
    """The seeded request alone on its uncached prompt (a chunked prefill),
    alone again (a prefix-cache hit), then batched with sampled requests."""
    body = work.seeded_body(round_index)
    alone = await client.complete(http, base, "seeded", body)
    again = await client.complete(http, base, "seeded", body)
    batch = await client.gather(
        client.complete(http, base, "seeded", body),
        *(client.complete(http, base, "companion", {**work.stream_body(2 * i + 1),
                                                      "max_tokens": work.settings.probe_tokens})
          for i in range(SEEDED_COMPANIONS)))
    return {"alone": alone.record(True), "again": again.record(True),
            "batched": batch[0].record(True),
            "companions": [o.record() for o in batch[1:]],
            "reproduced_alone": bool(alone.token_ids) and alone.token_ids == again.token_ids,
            "reproduced": bool(alone.token_ids) and alone.token_ids == batch[0].token_ids}


async def wait_idle(base: str) -> float:
    """Seconds until no request runs or waits (aborted ones freed)."""
    started = time.perf_counter()
    while time.perf_counter() - started < IDLE_WAIT_S:
        m = probes.metrics(base)
        if m.get("vllm:num_requests_running", 0) == 0 and m.get(
                "vllm:num_requests_waiting", 0) == 0:
            break
        await asyncio.sleep(1)
    return round(time.perf_counter() - started, 1)


async def run_rounds(base: str, port: int, log: Path, work: Workload,
                     memprobe_dir: Path | None) -> dict:
    s = work.settings
    processes = probes.server_processes(port)
    watch = probes.LogWatch(log)
    started = time.perf_counter()
    out = {"processes": {role: p.pid for role, p in processes.items()},
           "start": {"memory_mib": probes.memory_mib(processes),
                     "log": watch.new_problems()},
           "rounds": []}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits) as http:
        out["probes_fresh"] = await probe_pass(http, base, work)
        out["probes_cached"] = await probe_pass(http, base, work)
        if memprobe_dir is not None:  # starts tracing: later reports diff with this
            out["memprobe_baseline"] = memprobe_control.snapshot(
                memprobe_dir, "baseline", processes)
        for r in range(s.rounds):
            if time.perf_counter() - started > s.time_limit_s:
                out["stopped_after_rounds"] = r
                break
            round_out = {"round": r + 1, "load": await load_phase(http, base, work)}
            bad = await client.gather(*(client.send_bad_input(http, base, request)
                                        for request in work.bad_inputs.values()))
            round_out["bad_inputs"] = {name: o.record()
                                       for name, o in zip(work.bad_inputs, bad, strict=True)}
            round_out["seeded"] = await seeded_phase(http, base, work, r)
            round_out["idle_wait_s"] = await wait_idle(base)
            round_out["memory_mib"] = probes.memory_mib(processes)
            round_out["metrics"] = probes.metrics(base)
            round_out["healthy"] = probes.healthy(base)
            round_out["alive"] = probes.alive(processes)
            round_out["log"] = watch.new_problems()
            if memprobe_dir is not None:
                round_out["memprobe"] = memprobe_control.snapshot(
                    memprobe_dir, f"round{r + 1}", processes)
            out["rounds"].append(round_out)
            print(report.round_line(round_out), flush=True)
        out["probes_after_load"] = await probe_pass(http, base, work)
    out["final"] = {"healthy": probes.healthy(base), "alive": probes.alive(processes),
                    "log": watch.new_problems()}
    return out


def run_server(settings: StressSettings, server: str, work: Workload, model_dir: Path,
               log_dir: Path) -> dict:
    """Start one server, run the rounds against it, stop it."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{server}.log"
    memprobe_dir = log_dir / f"memprobe-{server}" if settings.memory_probe else None
    extra = ["--max-num-batched-tokens", str(settings.max_num_batched_tokens)]
    env_before = dict(os.environ)
    if memprobe_dir is not None:
        os.environ.update(memprobe_control.server_env(memprobe_dir))
    started = time.perf_counter()
    try:
        with vllm_server(model_dir, settings.speculative_config(server), log,
                         max_model_len=settings.max_model_len, extra_args=extra,
                         dtype=settings.dtype,
                         kv_cache_bytes=int(settings.kv_cache_gib * (1 << 30))) as base:
            start_s = time.perf_counter() - started
            port = int(base.rsplit(":", 1)[1])
            result = asyncio.run(run_rounds(base, port, log, work, memprobe_dir))
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    result.update(server=server, speculative_config=settings.speculative_config(server),
                  start_s=round(start_s, 1), wall_s=round(time.perf_counter() - started, 1),
                  log=str(log))
    return result


def run(settings: StressSettings, out_dir: Path, log_dir: Path, command: str) -> dict:
    from vllm_longspec.assets import ensure_default_target

    model_dir = ensure_default_target(progress=False)
    work = Workload(settings, PromptPool(tokenizer_for(model_dir)), str(model_dir))
    results = {"command": command, "settings": dataclasses.asdict(settings),
               "machine": describe_machine(), "software": describe_software(),
               "servers": {}}
    for server in settings.servers:
        print(f"[serve_stress] {server}", flush=True)
        results["servers"][server] = run_server(settings, server, work, model_dir, log_dir)
        results["servers"][server]["loadavg_after"] = os.getloadavg()
    results["summary"] = report.summarise(results)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    (out_dir / "results.md").write_text(report.markdown(results))
    return results


QUICK = {"rounds": 2, "streams": 4, "abort_streams": 2, "min_prompt_len": 300,
         "max_prompt_len": 900, "max_tokens": 24, "probes": 2, "probe_len": 400,
         "probe_tokens": 24, "seeded_len": 1200, "max_num_batched_tokens": 512,
         "kv_cache_gib": 1.0}


def parse_args(argv: list[str] | None = None
               ) -> tuple[StressSettings, Path, Path, bool]:
    defaults = StressSettings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few minutes per server")
    parser.add_argument("--servers", nargs="+", choices=("plain", "chain", "chain_fixed",
                                                         "tree"))
    for field in dataclasses.fields(StressSettings):
        if field.name in ("servers", "memory_probe"):
            continue
        parser.add_argument("--" + field.name.replace("_", "-"), type=type(field.default))
    parser.add_argument("--memory-probe", action="store_true")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--log-dir", type=Path)
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite results.md from --out's results.json")
    args = parser.parse_args(argv)
    values = dict(QUICK) if args.quick else {}
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(StressSettings)
                   if getattr(args, f.name) not in (None, False)})
    if args.servers:
        values["servers"] = tuple(args.servers)
    settings = dataclasses.replace(defaults, **values)
    out = args.out or REPOSITORY / "benchmarks" / "results" / (
        "serve_stress-quick" if args.quick else "serve_stress")
    return settings, out, args.log_dir or out / "logs", args.report_only


def rewrite_report(out: Path) -> dict:
    results = json.loads((out / "results.json").read_text())
    results["summary"] = report.summarise(results)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(report.markdown(results))
    return results


def main(argv: list[str] | None = None) -> None:
    settings, out, log_dir, report_only = parse_args(argv)
    if report_only:
        print(report.markdown(rewrite_report(out)))
        return
    command = shlex.join(["python", "-m", "benchmarks.serve_stress",
                          *(sys.argv[1:] if argv is None else argv)])
    results = run(settings, out, log_dir, command)
    print(report.markdown(results))


if __name__ == "__main__":
    main()
