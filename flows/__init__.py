"""Prefect flows that compose the stages, and the ``lmforge`` CLI. Flows compose; tasks work."""
