"""Flow: the whole pipeline, crawl to INT8 ONNX, as one run of nested subflows.

    data-refresh -> pretrain -> finetune -> release -> deploy

Each subflow can also run alone (from the UI or a deployment); here each hands the
artifact it produced to the next, so nothing upstream is re-resolved.

One pipeline run per profile at a time: the run holds ``<store>/_locks/pipeline-<profile>.lock``
(a file lock, so it also holds against ``lmforge run`` on the command line, another Prefect
server, or another host sharing the store). A second run of the same profile, a doubled
click or a schedule that overlaps a long run, waits for the first and then finds its
artifacts: its stages are cache hits. Runs of different profiles go on side by side (the
per-key stage locks still keep them from building one artifact twice).

Every flow ends by publishing what a person looks at in the Prefect UI (flows/artifacts.py):
its stage table, and here and in data-refresh the data funnel.
"""

from __future__ import annotations

import logging

from prefect import flow

from flows.artifacts import publish_run
from flows.config import DEFAULT_CONFIG, PipelineConfig
from flows.data_refresh import data_refresh
from flows.deploy import deploy
from flows.finetune import finetune
from flows.pretrain import pretrain
from flows.release import release
from storage.artifact import Store
from storage.atomic import exclusive


@flow(name="pipeline", log_prints=True)
def pipeline(config: PipelineConfig = DEFAULT_CONFIG) -> dict:
    """Run every stage and deploy the release if it is better; returns the refs of every artifact, every
    stage's record and the deploy decision.

    Args:
        config: Every stage's settings, crawl to export; the form starts from the profile the
            deployments were registered with (LMFORGE_CONFIG, else configs/demo.yaml).
    """
    store = Store(config.store)

    def waiting() -> None:
        logging.getLogger("lmforge.pipeline").info(
            "another pipeline run of profile %r holds %s; waiting for it to finish", config.name, store.root
        )

    with exclusive(store.lock_path("pipeline", config.name), on_wait=waiting):
        data = data_refresh(config)
        trained = pretrain(config, dataset=data["dataset"])
        tuned = finetune(config, base_model=trained["model"])
        released = release(config, model=tuned["model"])
        deployed = deploy(config, release=released["export"])
    records = {**data["records"], **trained["records"], **tuned["records"], **released["records"]}
    for stage, record in deployed["records"].items():  # the release's own comparison is the one to show
        records.setdefault(stage, record)
    publish_run("pipeline", records, funnel=True)
    return {**released, "deploy": deployed["decision"], "records": records}
