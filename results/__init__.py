"""Accuracy-vs-NFE sweeps over samplers and block sizes, through lm-eval's Python API.

    python -m results                 # run (or resume) the default grid, then write tables and plots
    python -m results report          # only rebuild tables/plots from the runs already on disk

See `python -m results --help`.
"""
