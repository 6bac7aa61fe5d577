"""A model swap to a version that does not load is refused, and the replica keeps its model.

The refusal does not raise: Serve stops a replica whose reconfigure raises (and starts new ones that
fail the same way), so raising would take the service down over a broken version.
"""

import json
import re

import pytest

from serve.editor import Editor, LoadedModel


def test_a_broken_version_is_refused_and_the_old_model_keeps_serving(tmp_path):
    broken = tmp_path / "manifest.json"
    broken.write_text(json.dumps({"stage": "icd", "identity": "b40ken", "base": "toy",
                                  "adapters": {"icd_forward": str(tmp_path / "missing")},
                                  "boundaries": {"reverse": [999, 779, 519, 259], "forward": [19, 259, 519, 779]}}))
    editor = Editor.func_or_class()  # the deployment's class, without Serve
    editor.model = old = LoadedModel(pipeline=object(), name="icd-toy", version="3", source="models:/icd-toy@champion")
    editor.reconfigure({"model_uri": str(broken)})
    assert editor.model is old
    assert re.match(r"cannot serve .*manifest.json = icd version b40ken: .*still serving icd-toy version 3",
                    editor.refused_update), editor.refused_update


def test_a_replica_with_nothing_to_serve_fails_to_start_on_a_broken_version(tmp_path):
    broken = tmp_path / "manifest.json"
    broken.write_text(json.dumps({"stage": "icd", "identity": "b40ken", "base": "toy",
                                  "adapters": {"icd_forward": str(tmp_path / "missing")},
                                  "boundaries": {"reverse": [999, 779, 519, 259], "forward": [19, 259, 519, 779]}}))
    editor = Editor.func_or_class()
    with pytest.raises(RuntimeError, match=r"cannot serve .*manifest.json = icd version b40ken"):
        editor.reconfigure({"model_uri": str(broken)})
    assert editor.model is None
