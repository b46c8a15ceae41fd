"""The Prefect deployments (prefect.yaml) and the local stack that serves them (`selfinstruct stack`)."""
