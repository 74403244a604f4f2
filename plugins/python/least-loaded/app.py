"""least-loaded: a mint node-selection policy written in Python.

Chooses the eligible candidates with the lowest load (ties by the order the host gave
them), skipping any whose load exceeds `max-load` (thousandths of capacity, from the
configuration). Built into a WebAssembly component with componentize-py against mint's
WIT world `node-policy-plugin`; see docs/plugin-authors.md.
"""

import json

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import host
from wit_world.imports.types import ErrorKind, LogLevel, PluginError
from wit_world.exports.node_policy import Choice, SelectionRequest


def eligible(request: SelectionRequest, index: int) -> bool:
    """Whether candidate `index` meets the tier's requirements (the host checks again)."""
    c = request.candidates[index]
    r = request.requirements
    if c.cpus < r.min_cpus or c.memory_mib < r.min_memory_mib:
        return False
    if r.arch is not None and c.arch != r.arch:
        return False
    end = c.labels_start + c.labels_len
    if end > len(request.labels):
        return False
    have = {(l.key, l.value) for l in request.labels[c.labels_start:end]}
    return all((l.key, l.value) in have for l in r.labels)


class NodePolicy(exports.NodePolicy):
    def select(self, request: SelectionRequest) -> list[Choice]:
        config = json.loads(host.config())
        max_load = config.get("max-load", 1000)
        if not isinstance(max_load, int) or max_load < 0:
            raise Err(PluginError(ErrorKind.INVALID_INPUT, f"config `max-load` must be a whole number of thousandths, not {max_load!r}"))
        fit = [i for i in range(len(request.candidates)) if eligible(request, i)]
        light = [i for i in fit if request.candidates[i].load <= max_load]
        if len(light) < request.count:
            raise Err(PluginError(
                ErrorKind.UNSATISFIABLE,
                f"{len(light)} eligible nodes have load <= {max_load} (of {len(fit)} eligible), {request.count} needed",
            ))
        light.sort(key=lambda i: request.candidates[i].load)
        chosen = light[: request.count]
        host.log(LogLevel.INFO, "least-loaded chose", [("count", str(len(chosen))), ("eligible", str(len(fit)))])
        return [
            Choice(candidate=i, score=float(1000 - request.candidates[i].load), reason=f"load {request.candidates[i].load}")
            for i in chosen
        ]
