"""From a sweep's MLflow runs to what a reader sees: dashboard.py (HTML + CSV + PNGs), plots.py (the figures),
pareto.py (fronts), trends.py (rank correlations, trends.md), cli.py (`ulsweep report`, `ulsweep ui`)."""
