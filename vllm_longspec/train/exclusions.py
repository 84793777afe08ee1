"""Files that training must never read (the benchmarks' inputs).

Every file a source yields passes through ``ExclusionSet.allows``; a file whose
resolved path is listed, or lies under a listed directory, is skipped and
counted. The list is the config's ``exclude_paths`` plus the lines of
``exclude_list_file`` (default ``benchmarks/sources.txt``: one path per line,
``#`` comments and blank lines ignored; a missing file means no exclusions).
Relative entries are resolved against the working directory; ``{stdlib}``
expands to the running Python's standard-library directory (as in sources);
symlinks are resolved on both sides, so another spelling of the same file is
still caught.
"""

from __future__ import annotations

import logging
import sysconfig
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)


class ExclusionSet:
    def __init__(self, paths: Iterable[str | Path]):
        stdlib = sysconfig.get_paths()["stdlib"]
        self.paths = frozenset(
            Path(str(p).replace("{stdlib}", stdlib)).expanduser().resolve()
            for p in paths
        )
        self.skipped: list[Path] = []

    @classmethod
    def from_config(
        cls, exclude_paths: Iterable[str], exclude_list_file: str | None
    ) -> ExclusionSet:
        entries = list(exclude_paths)
        if exclude_list_file:
            list_file = Path(exclude_list_file).expanduser()
            if list_file.is_file():
                lines = list_file.read_text().splitlines()
                listed = [ln.strip() for ln in lines]
                entries += [ln for ln in listed if ln and not ln.startswith("#")]
                log.info("exclusion list %s: %d entries", list_file, len(listed))
            else:
                log.info("no exclusion list at %s: nothing excluded by it", list_file)
        return cls(entries)

    def allows(self, path: str | Path) -> bool:
        """False (and counted) if ``path`` or one of its parents is excluded."""
        resolved = Path(path).resolve()
        if resolved in self.paths or not self.paths.isdisjoint(resolved.parents):
            self.skipped.append(resolved)
            return False
        return True
