"""Large task inputs handed to Prefect as they are: no traversal of their contents.

Before a task run starts, Prefect walks every parameter (lists, dicts, dataclasses, pydantic models, field by
field) looking for futures and states to resolve and to record as the run's inputs. A round hands its tasks
thousands of records; walking them took 24 s of CPU in a 500-prompt round (cProfile: `visit_collection`
under `collect_task_run_inputs_sync` and `_resolve_parameters`), on the same cores that send requests.
"""

from typing import TypeVar, cast

from prefect.utilities.annotations import quote

T = TypeVar("T")


def as_is(value: T) -> T:
    """`value`, marked so that Prefect passes it to the task unchanged without walking it (`quote`).

    Only for values that hold no futures or states: the round's records, requests and results.
    """
    return cast(T, quote(value))
