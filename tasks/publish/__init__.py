"""What a round shows people: Prefect artifacts, events and the data-ready decision, the HTML report and
its server, and terminal progress."""
