"""The pipeline's Prefect flows: thin compositions of tasks (see each module).

Prefect's engine logs two INFO lines per hook call ("Running hook 'x' in response to entering
state 'Completed'", "Hook 'x' finished running successfully") and a line per completed task
or flow run. The project's hooks are bookkeeping (a stage's run time, a command's list of its
runs) and each flow logs its own summary of its work, so those lines are dropped from the
terminal and the UI alike (which shows each run's state); a hook that fails and a run that does
not complete are still logged.
"""

from __future__ import annotations

import logging


class _WithoutEngineChatter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (
            message.startswith("Running hook ")
            or (message.startswith("Hook ") and message.endswith(" finished running successfully"))
            or message == "Finished in state Completed()"
        )


for _logger in ("prefect.engine", "prefect.flow_runs", "prefect.task_runs"):
    logging.getLogger(_logger).addFilter(_WithoutEngineChatter())
