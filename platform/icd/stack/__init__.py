"""The local stack: SeaweedFS S3, MLflow server and a Ray head on 127.0.0.1 (DESIGN.md)."""

from icd.stack.lifecycle import ServiceStatus, down, status, up
from icd.stack.settings import StackError, StackSettings, new_env_file_text

__all__ = ["ServiceStatus", "StackError", "StackSettings", "down", "new_env_file_text", "status", "up"]
