"""Gated promotion: alias ``champion`` moves to a candidate only if it passes every gate.

Metrics travel with each registered version as tags ``metric.<name>`` (``icd.psnr``,
``cycle.edit_success``, ...), so a decision needs nothing but the registry. A candidate that
fails gets alias ``challenger`` and a tag saying why. Tag ``icd.metrics_version`` says which
metric definitions produced them: a champion measured under other definitions is not a
yardstick (its PSNR meant something else), so only the thresholds apply.
"""

from __future__ import annotations

from dataclasses import dataclass, field

METRIC_TAG = "metric."
METRICS_VERSION_TAG = "icd.metrics_version"
CHAMPION, CHALLENGER = "champion", "challenger"


@dataclass
class Decision:
    promote: bool
    reasons: list[str] = field(default_factory=list)


def decide(candidate: dict[str, float], champion: dict[str, float] | None, gates) -> Decision:
    """Check each gate: the threshold on the candidate, then the regression against the champion."""
    reasons = []
    for gate in gates:
        value = candidate.get(gate.metric)
        if value is None:
            reasons.append(f"{gate.metric}: the candidate has no such metric")
            continue
        sign = 1.0 if gate.higher_is_better else -1.0
        if gate.threshold is not None and sign * (value - gate.threshold) < 0:
            relation = ">=" if gate.higher_is_better else "<="
            reasons.append(f"{gate.metric} = {value:.4g}, expected {relation} {gate.threshold:.4g}")
        if champion is not None and gate.max_regression is not None and gate.metric in champion:
            loss = sign * (champion[gate.metric] - value)
            if loss > gate.max_regression:
                reasons.append(f"{gate.metric} = {value:.4g} is {loss:.4g} worse than the champion's "
                               f"{champion[gate.metric]:.4g} (allowed {gate.max_regression:.4g})")
    return Decision(promote=not reasons, reasons=reasons)


def version_metrics(version) -> dict[str, float]:
    return {k[len(METRIC_TAG):]: float(v) for k, v in version.tags.items() if k.startswith(METRIC_TAG)}


def tag_metrics(client, name: str, version: str, metrics: dict[str, float], metrics_version: int | None = None) -> None:
    """Tag each metric as ``metric.<name>``, and the metric definitions' version (default: the current one)."""
    from icd.evaluation.job import METRICS_VERSION

    for key, value in metrics.items():
        client.set_model_version_tag(name, version, f"{METRIC_TAG}{key}", str(value))
    client.set_model_version_tag(name, version, METRICS_VERSION_TAG,
                                 str(METRICS_VERSION if metrics_version is None else metrics_version))


def promote(client, name: str, version: str, gates) -> Decision:
    """Move ``champion`` to ``version`` if it passes the gates against the current champion, else ``challenger``."""
    from mlflow.exceptions import MlflowException

    from icd.registry.model import tag_pickled_version

    tag_pickled_version(client, name, version)
    candidate = client.get_model_version(name, version)
    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        current = None
    if current is not None and current.version == str(version):
        return Decision(True, ["already the champion"])
    comparable = current is not None and (current.tags.get(METRICS_VERSION_TAG)
                                          == candidate.tags.get(METRICS_VERSION_TAG))
    decision = decide(version_metrics(candidate), version_metrics(current) if comparable else None, gates)
    if current is not None and not comparable:
        decision.reasons.append(f"not compared with champion version {current.version}: its metrics version is "
                                f"{current.tags.get(METRICS_VERSION_TAG, 'unknown')}, this one's "
                                f"{candidate.tags.get(METRICS_VERSION_TAG, 'unknown')} (thresholds only)")
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, version)
        summary = "; ".join([f"promoted over version {current.version}" if current else "first champion",
                             *decision.reasons])
        client.set_model_version_tag(name, version, "icd.promotion", summary)
    else:
        client.set_registered_model_alias(name, CHALLENGER, version)
        client.set_model_version_tag(name, version, "icd.promotion", "refused: " + "; ".join(decision.reasons))
    return decision
