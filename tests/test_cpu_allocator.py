"""runtime/cpu_allocator.py: CPU heap reuse during a pass -- bounded, switchable, a no-op off glibc.

Behaviour, not timing: page faults are counted (getrusage), the settings read back through their
effect, RSS compared before/after.
"""
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dreamforge_upscale.runtime import cpu_allocator
from dreamforge_upscale.tiling.retry import free_cache
from dreamforge_upscale.upscalers import GANUpscaler, upscale
from dreamforge_upscale.assets.bundled_model import bundled_model_path

REPO = Path(__file__).resolve().parents[1]
on_glibc = pytest.mark.skipif(cpu_allocator._load_glibc() is None, reason="needs glibc on Linux")


def test_switched_off_by_the_env_var():
    st = cpu_allocator.status({"DREAMFORGE_CPU_MALLOC": "0"}, glibc_present=True)
    assert not st.active and "DREAMFORGE_CPU_MALLOC=0" in st.reason


def test_left_alone_when_the_user_configured_malloc():
    st = cpu_allocator.status({"MALLOC_ARENA_MAX": "2"}, glibc_present=True)
    assert not st.active and "MALLOC_ARENA_MAX" in st.reason


def test_no_op_off_glibc():
    assert cpu_allocator._load_glibc("darwin") is None and cpu_allocator._load_glibc("win32") is None
    st = cpu_allocator.status({}, glibc_present=False)
    assert not st.active and "not glibc" in st.reason


def test_off_glibc_reuse_changes_nothing_and_upscaling_works(monkeypatch):
    monkeypatch.setattr(cpu_allocator, "_glibc", lambda: None)
    with cpu_allocator.reuse(torch.device("cpu")) as st:
        assert not st.active
    out, _ = upscale(GANUpscaler.load(bundled_model_path()), torch.rand(1, 24, 24, 3))
    assert out.shape == (1, 96, 96, 3)


def test_retained_bound_is_clamped(caplog):
    mib = 2**20
    assert cpu_allocator.keep_bytes({}) == cpu_allocator.DEFAULT_KEEP_MB * mib
    assert cpu_allocator.keep_bytes({"DREAMFORGE_CPU_MALLOC_KEEP_MB": "1"}) == 16 * mib
    assert cpu_allocator.keep_bytes({"DREAMFORGE_CPU_MALLOC_KEEP_MB": "999999"}) == 2047 * mib  # mallopt takes an int
    with caplog.at_level(logging.WARNING, logger="dreamforge_upscale"):
        assert cpu_allocator.keep_bytes({"DREAMFORGE_CPU_MALLOC_KEEP_MB": "lots"}) == cpu_allocator.DEFAULT_KEEP_MB * mib
    assert "DREAMFORGE_CPU_MALLOC_KEEP_MB" in caplog.text and "not a whole number" in caplog.text


def test_non_cpu_devices_are_not_touched():
    assert not cpu_allocator.configure(torch.device("meta")).active
    with cpu_allocator.reuse(torch.device("meta")) as st:
        assert not st.active


def test_logged_once(monkeypatch, caplog):
    for name in (cpu_allocator.ENV_SWITCH, *cpu_allocator.USER_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cpu_allocator, "_glibc", lambda: _RecordingGlibc())
    monkeypatch.setattr(cpu_allocator, "_state", {**cpu_allocator._state, "logged": False, "depth": 0})
    with caplog.at_level(logging.INFO, logger="dreamforge_upscale"):
        for _ in range(2):
            with cpu_allocator.reuse(torch.device("cpu")):
                pass
    assert caplog.text.count("DreamForge CPU memory reuse") == 1


# A child process: the experiment needs a clean allocator, and the settings are process-wide.
CHILD = textwrap.dedent(r"""
    import os, resource, sys, threading, psutil, torch
    sys.path.insert(0, sys.argv[1]); import pack_import; pack_import.install()
    from dreamforge_upscale.runtime import cpu_allocator
    torch.set_num_threads(1)
    os.environ[cpu_allocator.ENV_ARENA] = "1"  # the opt-in: the worker thread below shares the main arena
    assert cpu_allocator.configure().active  # before the worker thread starts, as the ComfyUI bridge does
    net = torch.nn.Sequential(*[torch.nn.Conv2d(4, 4, 3, padding=1) for _ in range(4)]).eval()
    # 36 MiB activations: over the 32 MiB up to which glibc raises its mmap threshold as blocks are freed,
    # so without reuse every pass maps them afresh however glibc has adapted
    x = torch.rand(1, 4, 1536, 1536)

    def faults(fn):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        fn()
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    def forward():
        with torch.inference_mode():
            net(x)

    results = {}
    def worker(result):
        forward()
        result["plain"] = faults(forward)
        rss0 = psutil.Process().memory_info().rss
        with cpu_allocator.reuse(torch.device("cpu")) as st:
            result["active"] = st.active
            forward(); forward()  # the heap settles (glibc's small remainders of aligned blocks) within two passes
            result["reused"] = faults(forward)
            with cpu_allocator.reuse(torch.device("cpu")):
                pass  # a nested pass ending must not restore the defaults under the outer one
            result["after_nested"] = faults(forward)
            result["rss_in"] = psutil.Process().memory_info().rss
        result["rss_grown_after"] = psutil.Process().memory_info().rss - rss0
        result["restored"] = faults(forward)
    for label, switch in (("on", "1"), ("off", "0")):
        os.environ["DREAMFORGE_CPU_MALLOC"] = switch  # read at every call
        results[label] = {}
        t = threading.Thread(target=worker, args=(results[label],))  # like ComfyUI's prompt worker
        t.start(); t.join()
    print("RESULT", results)
""")


@pytest.fixture(scope="module")
def child() -> dict:
    import os

    env = {k: v for k, v in os.environ.items() if k not in cpu_allocator.USER_ENV and k != cpu_allocator.ENV_ARENA}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(REPO / "scripts")], capture_output=True, text=True,
                          env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return eval(line[len("RESULT "):])  # noqa: S307 - our own child's dict of numbers


@on_glibc
def test_reuse_stops_page_faults_in_a_worker_thread_and_gives_the_memory_back(child):
    r = child["on"]
    assert r["active"]
    assert r["plain"] > 8_000  # every activation is a fresh mmap: faulted in again on each pass
    assert r["reused"] < r["plain"] / 4 and r["after_nested"] < r["plain"] / 4
    assert r["restored"] > r["plain"] / 2  # defaults back after the last pass
    assert r["rss_grown_after"] < 32 * 2**20  # the freed heap went back to the OS


@on_glibc
def test_env_switch_turns_it_off_in_a_real_run(child):
    r = child["off"]
    assert not r["active"] and r["reused"] > r["plain"] / 2


class _RecordingGlibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


def test_a_pass_planned_without_reuse_leaves_the_allocator_alone(monkeypatch):
    """tiling/cost.py may choose one tile without reuse over tiles with it (memory-tight CPU): then the
    pass must not switch glibc to keeping freed memory."""
    fake = _RecordingGlibc()
    for name in (cpu_allocator.ENV_SWITCH, *cpu_allocator.USER_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cpu_allocator, "_glibc", lambda: fake)
    monkeypatch.setattr(cpu_allocator, "_state", {**cpu_allocator._state, "arena_set": True, "depth": 0})
    with cpu_allocator.reuse(torch.device("cpu"), enabled=False) as st:
        assert not st.active and "off for this pass" in st.reason
    assert fake.calls == []
    with cpu_allocator.reuse(torch.device("cpu")) as st:
        assert st.active
    assert ("mallopt", cpu_allocator.M_MMAP_MAX, 0) in fake.calls and fake.calls[-1] == ("malloc_trim", 0)


def test_an_out_of_memory_inside_a_pass_gives_the_heap_back_for_the_retries(monkeypatch):
    """Memory is tight after an out-of-memory: the retries run with glibc's defaults and a trimmed heap."""
    fake = _RecordingGlibc()
    for name in (cpu_allocator.ENV_SWITCH, *cpu_allocator.USER_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cpu_allocator, "_glibc", lambda: fake)
    monkeypatch.setattr(cpu_allocator, "_state", {**cpu_allocator._state, "arena_set": True, "depth": 0})
    assert not cpu_allocator.release_for_retry()  # no pass: nothing to change
    assert fake.calls == []
    with cpu_allocator.reuse(torch.device("cpu")):
        fake.calls.clear()
        free_cache(torch.device("cpu"))  # what the tile-size retry calls after an out-of-memory
        assert fake.calls == [("mallopt", cpu_allocator.M_MMAP_MAX, cpu_allocator.DEFAULT_MMAP_MAX),
                              ("mallopt", cpu_allocator.M_TRIM_THRESHOLD, cpu_allocator.DEFAULT_TRIM_THRESHOLD),
                              ("malloc_trim", 0)]


@pytest.mark.parametrize("keep_mb, expected", [(None, 1024 * 2**20), (1500, 1500 * 2**20), (3000, -1)])
def test_the_heap_keeps_what_the_pass_needs(monkeypatch, keep_mb, expected):
    """A pass whose activations exceed the default bound (RRDB at 4x on a large image) raises it to the
    plan's predicted memory; past what mallopt's int holds, trimming is off for the pass, and the pass's
    end restores glibc's default and trims."""
    fake = _RecordingGlibc()
    for name in (cpu_allocator.ENV_SWITCH, cpu_allocator.ENV_KEEP_MB, *cpu_allocator.USER_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(cpu_allocator, "_glibc", lambda: fake)
    monkeypatch.setattr(cpu_allocator, "_state", {**cpu_allocator._state, "arena_set": True, "depth": 0})
    with cpu_allocator.reuse(torch.device("cpu"), keep=None if keep_mb is None else keep_mb * 2**20):
        assert ("mallopt", cpu_allocator.M_TRIM_THRESHOLD, expected) in fake.calls
    assert fake.calls[-2:] == [("mallopt", cpu_allocator.M_TRIM_THRESHOLD, cpu_allocator.DEFAULT_TRIM_THRESHOLD),
                               ("malloc_trim", 0)]


def _clean_env(monkeypatch):
    for name in (cpu_allocator.ENV_SWITCH, cpu_allocator.ENV_KEEP_MB, cpu_allocator.ENV_ARENA, *cpu_allocator.USER_ENV):
        monkeypatch.delenv(name, raising=False)


def test_a_pass_never_changes_the_arenas_and_ends_with_glibcs_defaults(monkeypatch):
    """The arena setting is process-wide and permanent, so a pass (API, command line, node) never makes it;
    what a pass does change is undone when it ends."""
    fake = _RecordingGlibc()
    _clean_env(monkeypatch)
    monkeypatch.setattr(cpu_allocator, "_glibc", lambda: fake)
    monkeypatch.setattr(cpu_allocator, "_state", {**cpu_allocator._state, "arena_set": False, "depth": 0})
    with cpu_allocator.reuse(torch.device("cpu")) as st:
        assert st.active
        assert fake.calls[:1] == [("mallopt", cpu_allocator.M_MMAP_MAX, 0)]
    assert not [c for c in fake.calls if c[:2] == ("mallopt", cpu_allocator.M_ARENA_MAX)]
    assert fake.calls[-3:] == [("mallopt", cpu_allocator.M_MMAP_MAX, cpu_allocator.DEFAULT_MMAP_MAX),
                               ("mallopt", cpu_allocator.M_TRIM_THRESHOLD, cpu_allocator.DEFAULT_TRIM_THRESHOLD),
                               ("malloc_trim", 0)]


def test_configure_changes_nothing_unless_the_host_opts_in(monkeypatch):
    fake = _RecordingGlibc()
    _clean_env(monkeypatch)
    monkeypatch.setattr(cpu_allocator, "_glibc", lambda: fake)
    monkeypatch.setattr(cpu_allocator, "_state", {**cpu_allocator._state, "arena_set": False, "depth": 0})
    cpu_allocator.configure(torch.device("cpu"))
    assert fake.calls == []
    monkeypatch.setenv(cpu_allocator.ENV_SWITCH, "0")  # the master switch wins over the opt-in
    monkeypatch.setenv(cpu_allocator.ENV_ARENA, "1")
    cpu_allocator.configure(torch.device("cpu"))
    assert fake.calls == []
    monkeypatch.delenv(cpu_allocator.ENV_SWITCH)
    cpu_allocator.configure(torch.device("cpu"))
    cpu_allocator.configure(torch.device("cpu"))  # once per process
    assert fake.calls == [("mallopt", cpu_allocator.M_ARENA_MAX, 1)]


# A fresh interpreter that loads the pack the way ComfyUI does and builds its node list, with every
# mallopt made through ctypes recorded (the pack reaches glibc through ctypes only).
REGISTER = textwrap.dedent(r"""
    import ctypes, json, sys
    calls = []
    class RecordingCDLL(ctypes.CDLL):
        def __getattr__(self, name):
            fn = super().__getattr__(name)
            if name != "mallopt":
                return fn
            def mallopt(param, value):
                calls.append((param, value))
                return fn(param, value)
            setattr(self, name, mallopt)
            return mallopt
    ctypes.CDLL = RecordingCDLL
    sys.path[:0] = [sys.argv[1], sys.argv[2]]
    from comfy.cli_args import args; args.cpu = True  # a CPU-only server: where the arena used to be set
    import asyncio
    from pack_as_custom_node import load_pack
    pack = load_pack("dreamforge_pack")
    nodes = asyncio.run(asyncio.run(pack.comfy_entrypoint()).get_node_list())
    assert nodes
    print("CALLS " + json.dumps(calls))
""")


def _register_in_fresh_comfy(extra_env: dict) -> list:
    import os

    from comfy_headless import comfyui_dir  # conftest puts scripts/ on sys.path

    try:
        root = comfyui_dir()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    env = {k: v for k, v in os.environ.items()
           if k not in (*cpu_allocator.USER_ENV, cpu_allocator.ENV_SWITCH, cpu_allocator.ENV_ARENA)}
    proc = subprocess.run([sys.executable, "-c", REGISTER, str(root), str(REPO / "tests")], capture_output=True,
                          text=True, env={**env, **extra_env}, cwd=root, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("CALLS "))
    return [tuple(c) for c in __import__("json").loads(line[len("CALLS "):])]


@on_glibc
def test_loading_and_registering_the_pack_leaves_the_allocator_alone():
    assert _register_in_fresh_comfy({}) == []


@on_glibc
def test_the_host_can_opt_in_to_sharing_the_main_arena():
    assert _register_in_fresh_comfy({cpu_allocator.ENV_ARENA: "1"}) == [(cpu_allocator.M_ARENA_MAX, 1)]
