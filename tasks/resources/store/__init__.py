"""The store: rounds and artifacts of a bootstrap run under one root URL (a folder or s3://bucket/prefix).

A round's files are written first and its manifest last, create-if-absent; readers only see rounds that
have a manifest.

Modules: `files` (the only one that talks to fsspec/s3fs), `layout` (paths under the root), `records` (round
files' Arrow schemas, derived from the pydantic records), `claims` (which run may write a round, under a
lease), `rounds` (`Store`: writing, committing and reading rounds; `open_store`), `completions` (a round's
completion cache), `slot` (one bootstrap round at a time per store, through Prefect).
"""
