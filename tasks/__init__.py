"""The work behind the flows, by concern.

`round/` one bootstrap round's stages; `resources/` the store, the LLM client and servers; `publish/` what
people see in Prefect and the report; `training/` export, fine-tune, evaluation; `quality/` the judge and the
audit; `prompts/` every prompt, as files. Pure functions first, thin Prefect tasks after.
"""
