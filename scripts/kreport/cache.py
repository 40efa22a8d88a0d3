"""Results of compiling one kernel specialisation, kept on disk by a key that names everything the
result depends on (source, specialisation, options, compiler versions, the report's own code), so
a rerun compiles only what changed. A missing or unreadable entry is simply compiled again."""

import hashlib
import json
import os
from pathlib import Path


def default_directory():
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fastkd" / "kernel-report"


def digest(*parts):
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(repr(part).encode())
        hasher.update(b"\0")
    return hasher.hexdigest()


# The report's modules whose code shapes a cached compile result (what is compiled, how, and how its
# machine code is read). The others (cases, metrics, rendering, gate) only use results: editing
# them re-renders the report from the cache.
COMPILE_MODULES = ("cuda_build.py", "cuda_sources.py", "sass.py", "triton_build.py")


def code_version(names=None):
    """A digest of the report's modules (all of them, or ``names``)."""
    folder = Path(__file__).parent
    paths = sorted(folder.glob("*.py")) if names is None else [folder / name for name in sorted(names)]
    return digest(*(path.read_bytes() for path in paths))


def compile_code_version():
    """Part of every cache key: changing how results are computed invalidates them."""
    return code_version(COMPILE_MODULES)


class ResultCache:
    def __init__(self, directory):
        self.directory = Path(directory) if directory else None
        if self.directory:
            self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self, key):
        return self.directory / f"{key}.json"

    def get(self, key):
        if not self.directory:
            return None
        try:
            return json.loads(self._path(key).read_text())
        except (OSError, ValueError):
            return None

    def put(self, key, result):
        if self.directory:
            temporary = self._path(key).with_suffix(f".{os.getpid()}.tmp")
            temporary.write_text(json.dumps(result, sort_keys=True))
            temporary.replace(self._path(key))
