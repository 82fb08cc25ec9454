"""JSON that strict parsers accept: no NaN or Infinity.

Python's json writes float('nan') as the bare word NaN, which is not JSON: jq, JavaScript
and `json.loads(..., parse_constant=...)` refuse the whole file. Every JSON file flowpre
writes goes through here, where a non-finite number becomes null (the record says why
elsewhere, e.g. metrics.jsonl's skipped_steps).
"""
import json
import math


def finite(obj):
    """`obj` with every non-finite float replaced by None; numpy and 0-d torch scalars become numbers."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if not isinstance(obj, (str, int, bool)) and obj is not None and getattr(obj, "ndim", None) == 0:
        return finite(obj.item())  # numpy scalars and 0-d arrays / tensors
    return obj


def dumps(obj, **kwargs):
    """json.dumps of `obj` with non-finite numbers as null; anything else that is not JSON raises."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)


def write(path, obj, indent=1):
    """`obj` to the file `path` as strict JSON, replaced atomically (atomic.py)."""
    from flowpre.atomic import write_text

    return write_text(path, dumps(obj, indent=indent) + "\n")
