"""From a sweep's MLflow runs to what a reader sees: dashboard.py (find the sweep, write the report folder),
sweepdata.py (runs -> DataFrames), columns.py (names and labels of their columns), plots.py (the figures),
tables.py (paper-style tables), page.py (the HTML page), png.py (static images), pareto.py (fronts),
trends.py (rank correlations, trends.md), compare.py (repeated configurations side by side, Welch's t),
optimum.py (the best bitrate of one base size, with a bootstrap
interval), basesize.py (base-model size against bitrate: optima, table, verdicts per claim), cli.py
(`ulsweep report`, `ulsweep ui`)."""
