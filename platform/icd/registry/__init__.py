"""MLflow model registry: the edit model as a pyfunc, registration, gated promotion."""
