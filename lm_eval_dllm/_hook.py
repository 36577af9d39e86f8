"""Makes an unmodified `lm_eval` see this package; imported by `lm_eval_dllm.pth` at start-up.

lm-eval discovers models through its registry only (no entry points). This module installs a
tiny import hook — no imports of its own, so a Python process that never imports lm-eval pays
nothing — that acts right after three lm-eval modules finish loading:

- `lm_eval.api.registry`: registers `dllm` as a lazy "module:Class" string, after first
  importing `lm_eval.models` (if the registry is non-empty, lm-eval never loads its built-in
  models, and `--model hf` would stop resolving);
- `lm_eval.tasks.manager`: adds this package's task folder (the bundled `modchain` task) to
  every TaskManager, before any user --include_path (so user tasks can override ours);
- `lm_eval.evaluator`: wraps `simple_evaluate` so that the NFE, tokens per forward and wall time
  the `dllm` model measured land in the results (per task) and in the samples (per sample);
- `lm_eval._cli.harness`: the CLI (`lm_eval`, `python -m lm_eval`, under `accelerate launch` too)
  prints our `DLLMError`s as one line and exits, instead of a traceback. The library itself only
  raises, so in-process callers (`simple_evaluate`, `results`) get the exception.

Every step is idempotent: the hook can run twice per interpreter harmlessly.
"""

import sys  # the only import at start-up: every other one is inside the step that needs it

_MARK = "_lm_eval_dllm_hook"


def _after_registry(module):
    import lm_eval.models  # noqa: F401  (registers the built-in models first)

    if "dllm" not in module.model_registry:
        module.model_registry.register("dllm", target="lm_eval_dllm.model:DLLM")


def _after_manager(module):
    cls = module.TaskManager
    if getattr(cls.__init__, _MARK, False):
        return
    orig = cls.__init__

    def __init__(self, *args, **kwargs):
        from lm_eval_dllm.tasks import task_dir

        names = orig.__code__.co_varnames[1:orig.__code__.co_argcount]
        bound = dict(zip(names, args)) | kwargs
        inc = bound.get("include_path")
        inc = [] if inc is None else list(inc) if isinstance(inc, (list, tuple)) else [inc]
        bound["include_path"] = [str(task_dir())] + inc
        orig(self, **bound)

    setattr(__init__, _MARK, True)
    __init__.__doc__ = orig.__doc__
    cls.__init__ = __init__


def _after_evaluator(module):
    if getattr(module.simple_evaluate, _MARK, False):
        return
    orig = module.simple_evaluate

    def simple_evaluate(*args, **kwargs):
        results = orig(*args, **kwargs)
        if results:
            from lm_eval_dllm.report import attach_stats

            attach_stats(results)
        return results

    setattr(simple_evaluate, _MARK, True)
    simple_evaluate.__doc__ = orig.__doc__
    simple_evaluate.__wrapped__ = orig
    module.simple_evaluate = simple_evaluate


def _after_cli(module):
    cls = module.HarnessCLI
    if getattr(cls.execute, _MARK, False):
        return
    orig = cls.execute

    def execute(self, *args, **kwargs):
        from lm_eval_dllm.utils import DLLMError

        try:
            return orig(self, *args, **kwargs)
        except DLLMError as e:
            raise SystemExit(f"lm_eval_dllm: error: {e}") from None

    setattr(execute, _MARK, True)
    execute.__doc__ = orig.__doc__
    cls.execute = execute


_AFTER = {
    "lm_eval.api.registry": _after_registry,
    "lm_eval.tasks.manager": _after_manager,
    "lm_eval.evaluator": _after_evaluator,
    "lm_eval._cli.harness": _after_cli,
}


class _Loader:
    """Delegates to the real loader, then runs our step on the freshly executed module."""

    def __init__(self, loader, after):
        self._loader, self._after = loader, after

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        try:
            self._after(module)
        except Exception as e:  # never break lm-eval itself
            print(f"lm_eval_dllm: could not hook {module.__name__}: {e}", file=sys.stderr)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _Finder:
    def find_spec(self, name, path=None, target=None):
        after = _AFTER.get(name)
        if after is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader, after)
                return spec
        return None


def install():
    if not any(getattr(f, _MARK, False) for f in sys.meta_path):
        finder = _Finder()
        setattr(finder, _MARK, True)
        sys.meta_path.insert(0, finder)
        # lm-eval already imported (the hook installed late): run the steps now
        for name, after in _AFTER.items():
            if name in sys.modules:
                after(sys.modules[name])


install()
