"""The stage DAG: order, reuse of finished steps, MLflow parent and child runs."""
