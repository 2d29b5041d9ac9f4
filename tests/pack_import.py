"""The tests' handle on scripts/pack_import.py (one implementation, shared with the command line).

conftest.py and subprocesses (test_oom_real.py) do `import pack_import; pack_import.install()`
with tests/ on sys.path.
"""
import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "dreamforge_pack_import", Path(__file__).resolve().parents[1] / "scripts" / "pack_import.py")
_impl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_impl)

REPO, BACKENDS, install = _impl.REPO, _impl.BACKENDS, _impl.install
