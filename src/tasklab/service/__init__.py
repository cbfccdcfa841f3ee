"""Reference service: the FastAPI shop with points and data-sync jobs."""
