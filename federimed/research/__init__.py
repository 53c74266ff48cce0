"""The researcher's side: the federation against local-only and centralized training on the
same data, the tuned baselines, the demo and its report.  Never in the app bundle."""
