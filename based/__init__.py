"""based: BASED linear-attention language models (Arora et al., 2024).

Importing the package is cheap: the model classes (and with them torch and transformers) load on first use
(PEP 562), so `based --help` starts in a fraction of a second. The Hugging Face Auto classes still resolve
`model_type: "based"` after a bare `import based`: AutoConfig, through which every Auto lookup of a saved
model goes, imports based.models (which registers the model type) before it reads a config.
"""
from __future__ import annotations

import importlib
import importlib.machinery
import sys

__version__ = "0.1.0"

__all__ = ["BasedConfig", "BasedForCausalLM", "BasedModel", "PRESETS", "__version__"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module(".models", __name__), name)
    if not name.startswith("__"):  # `import based; based.ops.X` worked when the import was eager
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


CONFIGURATION_AUTO = "transformers.models.auto.configuration_auto"


def _register_first(auto_config) -> None:
    """Make AutoConfig's readers import based.models before they look the model type up. Registering at the
    moment transformers loads would import based.models inside transformers' own import chain (circular)."""
    if getattr(auto_config, "_based_registers", False):
        return
    for name in ("from_pretrained", "for_model"):
        original = getattr(auto_config, name).__func__

        def reader(cls, *args, __original=original, **kwargs):
            importlib.import_module(".models", __name__)
            return __original(cls, *args, **kwargs)

        reader.__doc__, reader.__wrapped__ = original.__doc__, original
        setattr(auto_config, name, classmethod(reader))
    auto_config._based_registers = True


class _Loader:  # duck-typed importlib Loader, as in based_lm_eval_plugin.py
    def __init__(self, loader):
        self.loader = loader

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        _register_first(module.AutoConfig)


class _Finder:  # duck-typed MetaPathFinder: patches AutoConfig once transformers defines it
    def find_spec(self, fullname, path, target=None):
        if fullname != CONFIGURATION_AUTO:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


if CONFIGURATION_AUTO in sys.modules:
    _register_first(sys.modules[CONFIGURATION_AUTO].AutoConfig)
elif not any(isinstance(f, _Finder) for f in sys.meta_path):
    sys.meta_path.insert(0, _Finder())
