"""Verdicts and tables of a stress run (``serve_stress.py``'s results dict)."""

from __future__ import annotations

import math

# The server process whose memory the issue tracks; on CPU the model runs there.
WORKER = "worker"
ROLES = ("worker", "engine_core", "api_server")


def _round_requests(round_out: dict) -> list[dict]:
    seeded = round_out["seeded"]
    return (round_out["load"]["requests"] + round_out["load"]["probes"]
            + [seeded["alone"], seeded["again"], seeded["batched"], *seeded["companions"]])


def round_line(round_out: dict) -> str:
    load, memory = round_out["load"], round_out["memory_mib"]
    statuses = [r["status"] for r in _round_requests(round_out)]
    return (f"round {round_out['round']}: {load['seconds']} s, {load['tokens_per_s']} tok/s, "
            f"5xx {sum(s >= 500 for s in statuses)}, "
            f"worker RSS {memory.get(WORKER, {}).get('rss')} MiB, "
            f"tracebacks {len(round_out['log']['tracebacks'])}")


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first token where ``a`` and ``b`` differ (None: equal)."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _compare(passes: list[list[dict]], reference: list[dict]) -> dict:
    """How many probe answers of ``passes`` differ from ``reference``'s."""
    diffs = [first_difference(p["token_ids"], ref["token_ids"])
             for probes in passes for p, ref in zip(probes, reference, strict=True)]
    return {"answers": len(diffs), "differ": sum(d is not None for d in diffs),
            "first_differences": sorted(d for d in diffs if d is not None)}


def _probe_passes(server: dict) -> dict[str, list[list[dict]]]:
    return {"cached": [server["probes_cached"]],
            "in_load": [r["load"]["probes"] for r in server["rounds"]],
            "after_load": [server["probes_after_load"]]}


def _memory(server: dict) -> dict:
    rounds = server["rounds"]
    out = {}
    for role in ROLES:
        series = [r["memory_mib"].get(role, {}).get("rss") for r in rounds]
        start = server["start"]["memory_mib"].get(role, {}).get("rss")
        entry = {"start": start, "rounds": series}
        if len(series) >= 4 and None not in series:
            mid = series[math.ceil(len(series) / 2) - 1]
            entry.update(mid_round=math.ceil(len(series) / 2), mid=mid, last=series[-1],
                         growth_pct=round(100 * (series[-1] - mid) / mid, 2))
        out[role] = entry
    return out


def summarise(results: dict) -> dict:
    servers = results["servers"]
    plain = servers.get("plain")
    out = {}
    for name, server in servers.items():
        rounds = server["rounds"]
        requests = [q for r in rounds for q in _round_requests(r)]
        bad = [r["bad_inputs"] for r in rounds]
        logs = [server["start"]["log"], *(r["log"] for r in rounds), server["final"]["log"]]
        final = rounds[-1]["metrics"] if rounds else {}
        drafts = final.get("vllm:spec_decode_num_drafts_total", 0.0)
        accepted = final.get("vllm:spec_decode_num_accepted_tokens_total", 0.0)
        summary = {
            "rounds": len(rounds),
            "requests": len(requests) + sum(len(b) for b in bad),
            "status_5xx": sum(q["status"] >= 500 for q in requests)
            + sum(o["status"] >= 500 for b in bad for o in b.values()),
            "no_response": sum(q["status"] == 0 for q in requests),
            "engine_deaths": sum(lg["engine_dead"] for lg in logs)
            + sum(not (r["alive"] and r["healthy"]) for r in rounds)
            + int(not (server["final"]["alive"] and server["final"]["healthy"])),
            "tracebacks": sum(len(lg["tracebacks"]) for lg in logs),
            "bad_inputs": {n: sorted({b[n]["status"] for b in bad}) for n in (bad[0] if bad else {})},
            "bad_inputs_all_4xx": all(400 <= o["status"] < 500 for b in bad for o in b.values()),
            "tokens_per_s": [r["load"]["tokens_per_s"] for r in rounds],
            "memory": _memory(server),
            "seeded_ok": sum(all(r["seeded"][k]["status"] == 200
                                 for k in ("alone", "again", "batched")) for r in rounds),
            "seeded_reproduced_alone": sum(r["seeded"]["reproduced_alone"] for r in rounds),
            "seeded_reproduced": sum(r["seeded"]["reproduced"] for r in rounds),
            "mean_accepted_length": round(1 + accepted / drafts, 3) if drafts else None,
            "probes_vs_own_fresh": {k: _compare(v, server["probes_fresh"])
                                    for k, v in _probe_passes(server).items()},
        }
        if plain is not None:
            summary["probes_vs_plain_fresh"] = {
                k: _compare(v, plain["probes_fresh"])
                for k, v in {"fresh": [server["probes_fresh"]],
                             **_probe_passes(server)}.items()}
            summary["bad_inputs_as_plain"] = _same_answers(plain, server)
        out[name] = summary
    return out


def _same_answers(plain: dict, server: dict) -> dict[str, bool]:
    """Bad input -> same status and message as the plain server's (first round)."""
    if not plain["rounds"] or not server["rounds"]:
        return {}
    ours, theirs = server["rounds"][0]["bad_inputs"], plain["rounds"][0]["bad_inputs"]
    return {n: (ours[n]["status"], ours[n]["error"]) == (theirs[n]["status"], theirs[n]["error"])
            for n in ours}


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows]
    return lines + [""]


def markdown(results: dict) -> str:
    s, summary = results["settings"], results["summary"]
    machine, software = results["machine"], results["software"]
    lines = ["# Serve stress run", "", "Made by:", "", "```", results["command"], "```", "",
             f"{machine['cpu_model']}, {machine['usable_cores']} usable cores, load average "
             f"{machine['loadavg_at_start']} at start; vLLM {software['vllm']}, torch "
             f"{software['torch']}, commit {software['vllm_longspec_commit']}"
             f"{' (dirty)' if software['vllm_longspec_dirty'] else ''}.", "",
             f"Settings: dtype {s['dtype']}, {s['rounds']} rounds of {s['streams']} streams + "
             f"{s['abort_streams']} closed after {s['abort_after']} chunks + {s['probes']} "
             f"greedy probes, prompts {s['min_prompt_len']}-{s['max_prompt_len']} tokens, "
             f"max_tokens {s['max_tokens']}; seeded prompt {s['seeded_len']} tokens; "
             f"max-model-len {s['max_model_len']}, max-num-batched-tokens "
             f"{s['max_num_batched_tokens']}, KV cache {s['kv_cache_gib']} GiB.", "",
             "## Verdicts", ""]
    lines += _table(
        ["server", "rounds", "requests", "5xx", "no response", "engine deaths", "tracebacks",
         "bad inputs all 4xx", "seeded: all 200 / again = alone / batched = alone",
         "mean accepted length", "wall s"],
        [[n, v["rounds"], v["requests"], v["status_5xx"], v["no_response"],
          v["engine_deaths"], v["tracebacks"], v["bad_inputs_all_4xx"],
          f"{v['seeded_ok']} / {v['seeded_reproduced_alone']} / {v['seeded_reproduced']}",
          v["mean_accepted_length"], results["servers"][n].get("wall_s")]
         for n, v in summary.items()])
    lines += ["## Memory (RSS, MiB)", ""]
    rows = []
    for n, v in summary.items():
        for role in ROLES:
            m = v["memory"][role]
            rows.append([n, role, m["start"], *(m["rounds"][:1]), m.get("mid"), m.get("last"),
                         m.get("growth_pct"), " ".join(str(x) for x in m["rounds"])])
    lines += _table(["server", "process", "start", "round 1", "mid round", "last round",
                     "last vs mid %", "every round"], rows)
    lines += ["## Throughput of the load phase (tokens/s, all streams)", ""]
    lines += _table(["server", "every round"],
                    [[n, " ".join(str(x) for x in v["tokens_per_s"])] for n, v in summary.items()])
    lines += ["## Bad inputs (statuses over all rounds; message of the first)", ""]
    first = next(iter(results["servers"].values()))
    names = list(first["rounds"][0]["bad_inputs"]) if first["rounds"] else []
    rows = []
    for name in names:
        row = [name]
        for n in results["servers"]:
            same = summary[n].get("bad_inputs_as_plain", {}).get(name)
            mark = "" if same is None or n == "plain" else (" =plain" if same else " DIFFERS")
            row.append(f"{summary[n]['bad_inputs'][name]}{mark}")
        msg = first["rounds"][0]["bad_inputs"][name]["error"] or ""
        row.append(msg[:140].replace("|", "/").replace("\n", " "))
        rows.append(row)
    lines += _table(["input", *results["servers"], "message"], rows)
    lines += ["## Greedy probes: answers differing (first differing token)", ""]
    rows = []
    for n, v in summary.items():
        for reference in ("probes_vs_own_fresh", "probes_vs_plain_fresh"):
            for phase, c in v.get(reference, {}).items():
                rows.append([n, reference.removeprefix("probes_vs_"), phase,
                             f"{c['differ']}/{c['answers']}",
                             " ".join(map(str, c["first_differences"]))])
    lines += _table(["server", "compared with", "pass", "differ", "first differences"], rows)
    problems = [(n, t) for n, srv in results["servers"].items()
                for lg in [srv["start"]["log"], *(r["log"] for r in srv["rounds"]),
                           srv["final"]["log"]] for t in lg["tracebacks"]]
    lines += ["## Tracebacks in the server logs", ""]
    lines += [f"- {n}: {t}" for n, t in problems[:30]] or ["none"]
    return "\n".join(lines) + "\n"
