"""The plugin registry: entry-point discovery, ranking, forcing, fault isolation, duplicate names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types

import pytest

import qwenhw
from qwenhw import plugins
from qwenhw.errors import BadInput


@pytest.fixture
def fresh_registry():
    plugins.reset()
    yield
    plugins.reset()


EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "qwenhw-example-backend")


@pytest.fixture
def example_backend(tmp_path, fresh_registry):
    """The plugin-guide example as an installed distribution, for this test only: its dist-info (with the
    entry point its pyproject declares) on sys.path, found by importlib.metadata as pip would leave it. It is
    never installed into the environment, so no user plan can meet it."""
    dist = tmp_path / "qwenhw_example_backend-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: qwenhw-example-backend\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text("[qwenhw]\nexample = qwenhw_example\n")
    sys.path[:0] = [str(tmp_path), os.path.abspath(EXAMPLE)]
    plugins.reset()
    yield
    sys.path.remove(str(tmp_path))
    sys.path.remove(os.path.abspath(EXAMPLE))
    sys.modules.pop("qwenhw_example", None)
    plugins.reset()


def _module(name: str, body: str) -> types.ModuleType:
    module = types.ModuleType(name)
    exec(textwrap.dedent(body), module.__dict__)
    return module


def test_example_plugin_is_not_in_a_users_environment(fresh_registry):
    """The test setup does not install the plugin-guide example: a user's plans never meet it."""
    assert "example-eager" not in plugins.load().backends


def test_example_plugin_is_discovered_through_its_entry_point(example_backend):
    reg = plugins.load()
    assert "example-eager" in reg.backends
    assert reg.owners["example-eager"] == "qwenhw-example-backend"
    assert reg.owners["offload"] == "qwenhw-offload"  # the built-ins take the same path


def test_example_plugin_is_ranked_and_chosen_when_forced(example_backend, tiny_moe):
    plan = qwenhw.plan(str(tiny_moe), hardware=None)
    assert plan.backend != "example-eager"  # its modest estimate loses
    assert any(r.backend.startswith("example-eager") and "slower" in r.why for r in plan.rejected)
    forced = qwenhw.plan(str(tiny_moe), backend="example-eager")
    assert forced.backend == "example-eager" and forced.fits


@pytest.mark.slow
def test_example_plugin_is_used(example_backend, tiny_moe, hf_reference):
    with qwenhw.load(str(tiny_moe), backend="example-eager") as engine:
        out = engine.generate(hf_reference["prompt"], max_tokens=8, temperature=0)[0]
    assert list(out.token_ids) == hf_reference["tokens"]


def test_plugin_raising_in_plans_is_reported_and_skipped(fresh_registry, tiny_moe):
    broken = _module("broken_plugin", """
        import qwenhw
        class Broken(qwenhw.Backend):
            name = "broken"
            vendors = ("cpu",)
            def plans(self, spec, hardware, request):
                raise RuntimeError("kaboom in plans")
        @qwenhw.hookimpl
        def register_backends(register):
            register(Broken())
    """)
    reg = plugins.register_plugin(broken, "broken-dist")
    assert "broken" in reg.backends
    plan = qwenhw.plan(str(tiny_moe))
    assert plan.fits and plan.backend != "broken"
    assert any(r.backend == "broken" and "kaboom in plans" in r.why for r in plan.rejected)
    assert any(f.plugin == "broken" and f.stage == "plans" for f in plugins.load().faults)


def test_plugin_raising_in_register_is_reported_and_skipped(fresh_registry):
    broken = _module("broken_register", """
        import qwenhw
        @qwenhw.hookimpl
        def register_backends(register):
            raise ImportError("no module named vendor_sdk")
    """)
    reg = plugins.register_plugin(broken, "broken-register")
    assert "offload" in reg.backends
    assert any(f.plugin == "broken-register" and "vendor_sdk" in f.error for f in reg.faults)


def test_two_plugins_with_one_name_is_an_error_naming_both(fresh_registry):
    dup = _module("dup_plugin", """
        import qwenhw
        class Dup(qwenhw.Backend):
            name = "offload"
        @qwenhw.hookimpl
        def register_backends(register):
            register(Dup())
    """)
    with pytest.raises(BadInput) as err:
        plugins.register_plugin(dup, "qwenhw-dup")
    assert "qwenhw-offload" in str(err.value) and "qwenhw-dup" in str(err.value)


def test_plugin_that_fails_to_import_is_reported(tmp_path):
    # a real entry point whose module raises on import, found through importlib.metadata
    dist = tmp_path / "qwenhw_badimport-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: qwenhw-badimport\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[qwenhw]\nbad = qwenhw_badimport_mod\n")
    (tmp_path / "qwenhw_badimport_mod.py").write_text("raise RuntimeError('vendor library missing')\n")
    code = ("import json, qwenhw.plugins as p; r = p.load(); "
            "print(json.dumps([[f.plugin, f.stage, f.error] for f in r.faults] + [sorted(r.backends)]))")
    env = {"PYTHONPATH": str(tmp_path), "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    rows = json.loads(out.stdout)
    assert ["qwenhw-badimport", "import", "RuntimeError: vendor library missing"] in rows[:-1]
    assert "offload" in rows[-1]


def test_allowlist_limits_what_loads(fresh_registry, monkeypatch):
    monkeypatch.setenv("QWENHW_LOAD_PLUGINS", "qwenhw-offload")
    reg = plugins.load(force=True)
    assert sorted(reg.backends) == ["offload"] or "example-eager" not in reg.backends


def test_extra_models_and_probes_from_plugins(fresh_registry):
    extra = _module("extra_plugin", """
        import qwenhw
        from qwenhw.hardware.profile import Accelerator, ProbeResult
        from qwenhw.models import get
        @qwenhw.hookimpl
        def register_models(register):
            register(get("Qwen3-8B").with_(name="My-Qwen3-8B-Finetune", hf_id="me/ft"))
        @qwenhw.hookimpl
        def register_hardware_probes(register):
            register("fake-amd", lambda: ([Accelerator(index=0, vendor="amd", name="MI300X",
                                                       memory_bytes=192 * 2**30, bandwidth_gbs=5300)],
                                          ProbeResult("amdsmi", True, "1 GPU")))
    """)
    plugins.register_plugin(extra, "extra-dist")
    plan = qwenhw.plan("My-Qwen3-8B-Finetune", hardware="1xH100-80G")
    assert plan.model == "My-Qwen3-8B-Finetune"
    hw = qwenhw.detect()
    assert any(a.vendor == "amd" and a.name == "MI300X" for a in hw.accelerators)


def test_unknown_forced_backend_suggests(fresh_registry):
    with pytest.raises(BadInput) as err:
        qwenhw.plan("Qwen3-8B", hardware="1xH100-80G", backend="ofload")
    assert "offload" in str(err.value)


def test_trace_shows_every_registration_call():
    """QWENHW_TRACE_PLUGINS=1 prints each hook call, the registration hooks included (one per plugin)."""
    import qwenhw.plugins

    n = len(qwenhw.plugins.load().pm.hook.register_backends.get_hookimpls())
    env = {**os.environ, "QWENHW_TRACE_PLUGINS": "1"}
    out = subprocess.run([sys.executable, "-m", "qwenhw.cli", "backends"], capture_output=True, text=True, env=env,
                         check=True)
    assert out.stderr.count("finish register_backends") == n >= 2
    assert out.stderr.count("finish register_models") == len(
        qwenhw.plugins.load().pm.hook.register_models.get_hookimpls())
