"""Running: training with exact resume, papermill sweeps and reports, the trained zoo, notebook execution."""
