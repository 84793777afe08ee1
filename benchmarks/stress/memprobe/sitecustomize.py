"""Memory probe for the stress run's server processes (diagnosis only).

Python imports ``sitecustomize`` at start-up when it is on the path, in every
process: ``serve_stress.py --memory-probe`` puts this directory on the
servers' ``PYTHONPATH`` with ``VLLM_STRESS_MEMPROBE_DIR`` set, so the API
server, the engine core and the worker each start a thread that, whenever
the driver writes a label to ``DIR/request``, writes ``DIR/<label>-<pid>.json``:
the process's title, RSS, Python objects alive by type, torch tensors alive
(count, bytes, by shape), and the allocations still alive that grew most since
the first request (``tracemalloc`` runs from that request on, so it traces what
the rounds allocate and keep). Without the variable it does nothing.
"""

import os

if os.environ.get("VLLM_STRESS_MEMPROBE_DIR"):
    from memprobe_worker import start

    start(os.environ["VLLM_STRESS_MEMPROBE_DIR"])
