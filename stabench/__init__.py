"""stabench: how well training-stabilization techniques keep deep networks trainable.

    import stabench
    result = stabench.run("digits", "clip_norm(max_norm=0.5)", seeds=3, lrs=[0.1, 1.0])
    result.runs                      # per-run metrics (a DataFrame)
    summary = stabench.sweep("smoke")
    report = stabench.report("results/smoke")

Names are loaded on first use, so `python -m stabench` starts before JAX loads."""

import importlib

_EXPORTS = {  # public name -> module that defines it
    **dict.fromkeys(("Result", "spec", "run", "sweep", "sweep_plan", "load", "runs", "report",
                     "rerun", "diagnose", "diagnosis_spec"), "api"),
    "UserError": "registry",
    "RunSpec": "config",
    **dict.fromkeys(("register_method", "register_init", "register_optimizer", "register_model",
                     "register_dataset"), "plugins"),
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'stabench' has no attribute '{name}'")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
