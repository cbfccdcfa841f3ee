"""Performance lab: stress, bench, tune, drill, load and report."""
