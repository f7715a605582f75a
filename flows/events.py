"""The events lmforge's flows emit, which the deployments' automations follow (deployments/prefect.yaml).

    lmforge.dataset.published   data-refresh published a new dataset version   payload: dataset
    lmforge.model.pretrained    pretrain finished a model                      payload: model, dataset
    lmforge.model.finetuned     finetune finished a model                      payload: model, base_model
    lmforge.release.exported    release exported a model that passed the gate  payload: export, model
    lmforge.model.promoted      deploy promoted (or rolled back to) a model    payload: the decision
    lmforge.model.refused       deploy refused a model                         payload: the decision

Each event's resource is the artifact (``lmforge.<stage>.<key>``) and carries the name of
the deployment whose run emitted it (``lmforge.deployment``; empty for a subflow of the
pipeline, whose stages are chained already), so an automation can follow one deployment.
"""

from __future__ import annotations

from typing import Any

from prefect import runtime
from prefect.events import emit_event

DATASET_PUBLISHED = "lmforge.dataset.published"
MODEL_PRETRAINED = "lmforge.model.pretrained"
MODEL_FINETUNED = "lmforge.model.finetuned"
RELEASE_EXPORTED = "lmforge.release.exported"
MODEL_PROMOTED = "lmforge.model.promoted"
MODEL_REFUSED = "lmforge.model.refused"


def announce(event: str, ref: str, **payload: Any) -> None:
    """Emit ``event`` about the artifact ``ref`` ('stage/key'), labelled with the emitting deployment."""
    resource = {
        "prefect.resource.id": "lmforge." + ref.replace("/", "."),
        "lmforge.deployment": runtime.deployment.name or "",
    }
    emit_event(event=event, resource=resource, payload=payload)
