"""Gated promotion: the decision rules, and aliases in a real (SQLite) MLflow registry."""

import mlflow

from icd.config import Gate
from icd.registry.promotion import CHALLENGER, CHAMPION, decide, promote, tag_metrics

GATES = [Gate(metric="icd.psnr", threshold=20.0, max_regression=0.5),
         Gate(metric="icd.lpips", higher_is_better=False, max_regression=0.01)]


def test_thresholds_and_regressions_each_give_a_reason():
    assert decide({"icd.psnr": 25, "icd.lpips": 0.1}, None, GATES).promote
    low = decide({"icd.psnr": 19, "icd.lpips": 0.1}, None, GATES)
    assert not low.promote and low.reasons == ["icd.psnr = 19, expected >= 20"]
    champion = {"icd.psnr": 25.0, "icd.lpips": 0.10}
    assert decide({"icd.psnr": 24.6, "icd.lpips": 0.105}, champion, GATES).promote  # within the allowance
    worse = decide({"icd.psnr": 24.0, "icd.lpips": 0.2}, champion, GATES)
    assert not worse.promote and len(worse.reasons) == 2
    assert "1 worse than the champion's 25" in worse.reasons[0] and "icd.lpips" in worse.reasons[1]
    assert decide({}, None, GATES).reasons[0] == "icd.psnr: the candidate has no such metric"


def test_aliases_move_only_for_a_passing_candidate(tmp_path):
    uri = f"sqlite:///{tmp_path}/registry.db"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("icd-gates")
    experiment = client.create_experiment("gates", artifact_location=str(tmp_path / "a"))
    versions = []
    for psnr in (25.0, 23.0, 25.2):
        run = client.create_run(experiment)
        version = client.create_model_version("icd-gates", f"runs:/{run.info.run_id}/model", run.info.run_id)
        tag_metrics(client, "icd-gates", version.version, {"icd.psnr": psnr, "icd.lpips": 0.1})
        versions.append(version.version)

    assert promote(client, "icd-gates", versions[0], GATES).promote
    assert client.get_model_version_by_alias("icd-gates", CHAMPION).version == versions[0]
    refused = promote(client, "icd-gates", versions[1], GATES)
    assert not refused.promote and "worse than the champion" in refused.reasons[0]
    assert client.get_model_version_by_alias("icd-gates", CHAMPION).version == versions[0]
    assert client.get_model_version_by_alias("icd-gates", CHALLENGER).version == versions[1]
    assert client.get_model_version("icd-gates", versions[1]).tags["icd.promotion"].startswith("refused: icd.psnr")
    assert promote(client, "icd-gates", versions[2], GATES).promote
    assert client.get_model_version_by_alias("icd-gates", CHAMPION).version == versions[2]


def test_a_champion_measured_under_other_metric_definitions_is_not_a_yardstick(tmp_path):
    uri = f"sqlite:///{tmp_path}/registry.db"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("icd-gates")
    experiment = client.create_experiment("gates", artifact_location=str(tmp_path / "a"))

    def register(psnr: float, metrics_version: int | None = None) -> str:
        run = client.create_run(experiment)
        version = client.create_model_version("icd-gates", f"runs:/{run.info.run_id}/model", run.info.run_id)
        tag_metrics(client, "icd-gates", version.version, {"icd.psnr": psnr, "icd.lpips": 0.1}, metrics_version)
        return version.version

    old = register(25.0, metrics_version=1)  # e.g. a PSNR of the set's MSE
    assert promote(client, "icd-gates", old, GATES).promote
    # 3 dB under the old champion's number, but that number meant something else: thresholds only.
    lower = register(22.0)
    decision = promote(client, "icd-gates", lower, GATES)
    assert decision.promote and "metrics version is 1" in decision.reasons[0]
    assert client.get_model_version_by_alias("icd-gates", CHAMPION).version == lower
    assert "thresholds only" in client.get_model_version("icd-gates", lower).tags["icd.promotion"]
    # Under the same definitions the regression gate applies again.
    worse = register(21.0)
    assert not promote(client, "icd-gates", worse, GATES).promote
    assert client.get_model_version_by_alias("icd-gates", CHAMPION).version == lower
    # A threshold still refuses a candidate whatever the champion was measured with.
    assert client.set_registered_model_alias("icd-gates", CHAMPION, old) is None
    refused = promote(client, "icd-gates", register(19.0), GATES)
    assert not refused.promote and refused.reasons[0] == "icd.psnr = 19, expected >= 20"
