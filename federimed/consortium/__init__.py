"""What runs at the consortium, in the ServerApp's process: never a patient record, only the
hospitals' updates, their metrics and the common test set.

- ``run``: one run (:class:`~federimed.consortium.run.ServerRun`), what ``server_app/`` starts;
- ``strategy``: the run config's Flower strategy, wrapped for the record and the checks;
- ``checks``: what every reply must pass before it is aggregated;
- ``grid``: the run's deadline around Flower's grid;
- ``recorder``: the round record (``rounds.jsonl``);
- ``resume``: continuing a dead run from its checkpoints;
- ``global_model``: the server's copy of each track's model, scored and saved.
"""
