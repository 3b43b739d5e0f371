"""The one error hierarchy: every exception the project raises derives from ``HeadroomError``.

    HeadroomError
    ├── ConfigError        a spec, scenario, model reference or topology is wrong (before anything runs)
    ├── InfeasiblePlan     a planner found no placement; the message carries the numbers
    │   └── OutOfScope     the instance is larger than an exact solver is documented to handle
    ├── AlgorithmFailure   an algorithm's run failed in a way that is a *result* (OOM kill, ...)
    │   └── MigrationRefused   refused before anything moved (the current placement is intact)
    ├── BackendError       the testbed itself could not do what was asked (the run cannot proceed)
    ├── AgentError         a node agent (or its control connection) failed or refused a request
    └── ProtocolError      a peer broke the wire protocol (bad frame, version, shape)

Subclasses defined next to the code that raises them (``NetworkError``, ``BudgetError``, ...) derive
from one of these. Where a class was a ``ValueError`` before, it still is (a mixin), so callers that
catch the builtin keep working. Across a process boundary an error travels as its ``code`` (see
``error_code``), never as a class name.
"""
from __future__ import annotations


class HeadroomError(Exception):
    """Base of every project exception. ``code`` names the kind on the wire and in events."""

    code = "error"


class ConfigError(HeadroomError):
    """Configuration is invalid. ``problems`` (when given) are ``FILE:LINE: field: message`` items."""

    code = "config"

    def __init__(self, problems=None):
        if problems is None or isinstance(problems, str):
            self.problems = [problems or "invalid configuration"]
            super().__init__(self.problems[0])
        else:
            self.problems = list(problems)
            super().__init__("\n".join(str(p) for p in self.problems))


class InfeasiblePlan(HeadroomError, ValueError):
    """No placement satisfies the memory limits (or the request is out of an algorithm's scope)."""

    code = "infeasible"


class OutOfScope(InfeasiblePlan):
    """The instance is larger than an exact solver is documented to handle."""

    code = "out_of_scope"


class AlgorithmFailure(HeadroomError):
    """The current algorithm's run failed in a way that is a *result* (OOM kill, infeasible plan)."""

    code = "algorithm_failed"


class AgentLost(AlgorithmFailure):
    """An agent holding blocks died without running out of memory (a crash, ``kill_agent``): the
    device is still there, so a backend that can restart it (``recover``) lets the run go on."""

    code = "agent_lost"

    def __init__(self, message: str, hosts: list[str]):
        super().__init__(message)
        self.hosts = list(hosts)


class MigrationRefused(AlgorithmFailure):
    """A migration was refused before anything moved (no memory-safe order): the current
    placement is intact, so the run can go on with it."""

    code = "migration_refused"


class BackendError(HeadroomError):
    """A backend could not do what was asked (the run itself cannot proceed)."""

    code = "backend"


class AgentError(HeadroomError):
    """A node agent failed a request, or its control connection did."""

    code = "agent"


class TokenFailed(AgentError):
    """A token could not be finished on an agent (a peer failed, a block raised): the agent is alive."""

    code = "token_failed"


class ProtocolError(HeadroomError):
    """A peer broke the protocol (unexpected message, bad shape, version mismatch)."""

    code = "protocol"


def error_code(exc: BaseException) -> str:
    """The code an exception travels under: its ``code`` for project errors; ``timeout`` and
    ``runtime`` for the builtins an agent's compute path raises (torch raises ``RuntimeError``);
    ``internal`` for anything else."""
    if isinstance(exc, HeadroomError):
        return exc.code
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, RuntimeError):
        return "runtime"
    return "internal"
