"""Tools users run beside the training scripts: the demo, the benchmark, log comparison."""
