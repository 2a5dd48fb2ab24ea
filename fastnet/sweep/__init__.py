"""`fastnet sweep`: hyper-parameter search over `fastnet train` settings.

space.py    the search space: which settings vary and over what, read from a TOML file and checked
            whole before any trial runs; default_space.toml is the one fastnet ships
trial.py    one trial, in a Dask worker: ask the study, train with an after-epoch hook that reports
            the validation accuracy and prunes, tell the study how it ended
run.py      the driver: the checks, the study in its database, the workers kept busy, the results
"""
