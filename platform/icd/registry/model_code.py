"""The registered model's code, logged as an MLflow "model from code".

MLflow stores this file (not a pickle of the model object) and runs it when the model loads;
``set_model`` names the object to serve. Loading a version therefore runs only this file and the
``icd`` package shipped beside it (``code_paths``), whatever Python or cloudpickle version logged it.
"""

import mlflow

from icd.registry.model import ICDEditModel

mlflow.models.set_model(ICDEditModel())
