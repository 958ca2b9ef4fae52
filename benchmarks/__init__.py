"""The project's experiments and speed benchmarks, run from the checkout's root as ``python -m benchmarks.<name>``;
what the experiments share is in :mod:`benchmarks.experiment`."""
