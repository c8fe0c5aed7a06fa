"""The job store's Alembic migrations (env.py, versions/), shipped inside the package so an
installed wheel and the container image can migrate a store (`render-video migrate`)."""
