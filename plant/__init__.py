"""The plant side: what a plant is and the data it gives, read without the training loop.

``catalog`` (a plant's variables), ``bsm1`` (the simulated plant), ``influent`` (its influent files, storms and
overloads), ``operation`` (how a scenario's plant is run), ``scenarios`` (the simulated dataset: cache, files,
splits), ``whatif`` and ``branching`` (the simulator branched from saved states under other plans),
``export_reader``, ``export_values`` and ``historian`` (a plant's own export read, its values checked, then
imported), ``example_export`` (a
simulated plant's historian export, for the walk-through), ``config`` (the ``[data]`` settings) and ``executor``
(local processes or a Dask cluster). Imports flow one way: training -> plant -> modelcard; nothing here imports
training, the service or export.
"""
