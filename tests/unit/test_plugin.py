"""Plugin registration: discovery, idempotence, the vLLM version gate."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest

from vllm_longspec import plugin


def test_entry_point_is_discoverable():
    names = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert names.get("longspec") == "vllm_longspec.plugin:register"


def test_register_is_idempotent():
    from vllm import ModelRegistry
    from vllm.engine.arg_utils import EngineArgs

    plugin.register()
    wrapped = EngineArgs.create_speculative_config
    plugin.register()
    plugin._registered = False  # even a second full pass must not wrap twice
    plugin.register()
    assert EngineArgs.create_speculative_config is wrapped
    assert "LongSpecForCausalLM" in ModelRegistry.get_supported_archs()


@pytest.fixture
def no_override(monkeypatch):
    """The version check as a user without the override gets it, whatever the
    environment running the tests sets."""
    monkeypatch.delenv(plugin.VERSION_OVERRIDE_ENV, raising=False)


@pytest.mark.parametrize("version", ["0.32.0", "0.32.7", "0.32.1rc1"])
def test_supported_versions(version, no_override):
    assert plugin.check_vllm_version(version) is None  # raises otherwise


@pytest.mark.parametrize("override", [None, "0", "true"])
@pytest.mark.parametrize("version", ["0.31.2", "0.33.0", "1.0.0"])
def test_other_versions_fail_clearly(version, override, monkeypatch):
    """Only the override's value "1" lets another version through."""
    if override is None:
        monkeypatch.delenv(plugin.VERSION_OVERRIDE_ENV, raising=False)
    else:
        monkeypatch.setenv(plugin.VERSION_OVERRIDE_ENV, override)
    with pytest.raises(plugin.UnsupportedVLLMVersionError,
                       match=f"supports vLLM 0.32.x, found vLLM {version}"):
        plugin.check_vllm_version(version)
    monkeypatch.setenv(plugin.VERSION_OVERRIDE_ENV, "1")
    plugin.check_vllm_version(version)


def test_installed_vllm_is_the_pinned_one(no_override):
    import vllm

    assert vllm.__version__.split(".")[:2] == plugin.SUPPORTED_VLLM.split(".")
    assert plugin.check_vllm_version(vllm.__version__) is None  # raises otherwise
