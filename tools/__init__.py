"""Tools users run beside the training scripts: the demo, the benchmarks, log comparison."""
import util  # noqa: F401  first, before torch: device plugins load on demand (see util/__init__.py)
