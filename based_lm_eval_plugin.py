"""Makes plain `lm_eval --model based --tasks based_swde ...` work once `based` is installed.

lm-eval 0.4 finds models only in its own registry (lm_eval/models/__init__.py, MODEL_MAPPING) and tasks
only in its own folder plus --include_path; it has no plugin entry point. So the `based-lm-eval.pth` file
that installing `based` puts in site-packages imports this module at interpreter start-up. It imports
nothing heavy (no torch, no lm_eval): it only watches for lm-eval's own modules being imported, then

- after `lm_eval.models` loads: registers "based" as a lazy placeholder "based.eval.harness:BasedLM"
  (materialised, and torch imported, only when a user asks for the model);
- after `lm_eval.tasks.manager` loads: adds our task folder (based/eval/tasks) after lm-eval's own, so
  based_swde, based_fda, based_squad_completion and the group based_recall resolve without --include_path.

Set BASED_LM_EVAL_PLUGIN=0 to switch it off.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys

MODEL_TARGET = "based.eval.harness:BasedLM"


def _tasks_dir() -> str:
    # find_spec of a top-level package locates it (editable installs included) without importing it.
    return os.path.join(os.path.dirname(importlib.util.find_spec("based").origin), "eval", "tasks")


def _register_model(module) -> None:
    from lm_eval.api.registry import model_registry

    if "based" not in model_registry:
        model_registry.register("based", target=MODEL_TARGET)


def _add_task_path(module) -> None:
    import inspect

    manager = module.TaskManager
    if getattr(manager.__init__, "_based_tasks", False):
        return
    original = manager.__init__
    signature = inspect.signature(original)
    tasks = _tasks_dir()

    def __init__(*args, **kwargs):
        # Bound as lm-eval's own signature binds them, so positional and keyword calls both work.
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        given = bound.arguments.get("include_path")
        # Only alongside lm-eval's default tasks: a caller that excludes them asked for an exact set.
        if bound.arguments.get("include_defaults", True):
            paths = [] if given is None else list(given) if isinstance(given, (list, tuple)) else [given]
            if not any(os.path.realpath(str(p)) == os.path.realpath(tasks) for p in paths):
                bound.arguments["include_path"] = [tasks, *paths]  # the user's paths come later and win
        original(*bound.args, **bound.kwargs)

    __init__._based_tasks = True
    manager.__init__ = __init__


AFTER_IMPORT = {"lm_eval.models": _register_model, "lm_eval.tasks.manager": _add_task_path}


class _Loader:  # duck-typed importlib Loader; importlib.abc would cost ~9 ms at every start-up
    def __init__(self, loader, then):
        self.loader, self.then = loader, then

    def __getattr__(self, name):  # get_source, is_package, ...: the real loader's
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        try:
            self.then(module)
        except Exception as e:  # never break lm-eval itself over the plugin
            print(f"based: lm-eval plugin not installed ({type(e).__name__}: {e})", file=sys.stderr)


class _Finder:  # duck-typed MetaPathFinder
    def find_spec(self, fullname, path, target=None):
        then = AFTER_IMPORT.get(fullname)
        if then is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _Loader(spec.loader, then)
        return spec


def install() -> None:
    if os.environ.get("BASED_LM_EVAL_PLUGIN", "1") == "0" or any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Finder())
    for name, then in AFTER_IMPORT.items():  # already imported (e.g. installed after start-up)
        if name in sys.modules:
            then(sys.modules[name])
