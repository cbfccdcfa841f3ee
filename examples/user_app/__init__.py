"""A minimal Celery application of "your own", to point the tasklab lab at (see README.md)."""
