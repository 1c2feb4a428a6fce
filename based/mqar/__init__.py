"""MQAR recall experiments (BASED paper, figure 2): the 2-layer model, training, sweeps and the Pareto plot.

    from based.mqar import quick_runs, run_sweep
    rows = run_sweep(quick_runs(), "out/mqar-quick")     # out/mqar-quick/{results.jsonl, pareto.png}
"""
from .model import MQARModel, mqar_config
from .plot import best_per_model, frontier, plot_pareto
from .sweeps import SWEEPS, figure2_runs, figure2_short_runs, quick_runs, read_results, run_sweep
from .stacked import group_runs, train_stacked
from .train import MQARRun, MQARTask, evaluate, train_mqar

__all__ = [
    "MQARModel", "mqar_config", "MQARRun", "MQARTask", "train_mqar", "evaluate", "train_stacked", "group_runs",
    "SWEEPS", "figure2_runs", "figure2_short_runs", "quick_runs", "run_sweep", "read_results",
    "plot_pareto", "best_per_model", "frontier",
]
