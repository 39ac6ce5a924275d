"""`make bench`: speed and scale benchmarks. Speed is always a ratio measured side by side in one run."""
