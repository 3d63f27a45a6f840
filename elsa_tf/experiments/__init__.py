"""The training program's library side: model zoo, datasets, baseline, report."""
