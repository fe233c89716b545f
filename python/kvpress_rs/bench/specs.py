"""Which caches a benchmark runs: method specs, their expansion over compression ratios,
and the cache object each builds — ours by name, transformers' ``DynamicCache`` and
``QuantizedCache``, and the NVIDIA kvpress 0.5.5 press of the same name (run elsewhere, see
``kvpress_env``).

A spec is ``"name"`` or ``"name:key=value,key=value"``:

- ``full`` — transformers' ``DynamicCache`` (the baseline every ratio is measured against);
- any policy of ``kvpress_rs.policies.CACHES`` (``snapkv``, ``knorm``, …) — an eviction
  cache, run at every ``--ratios`` value; keyword arguments go to its constructor;
- ``quantized:bits=4,group_size=32`` — ``kvpress_rs.QuantizedKVCache``;
- ``quanto:nbits=4`` — transformers' ``QuantizedCache`` with the optimum-quanto backend
  (when importable).

>>> expand(["full", "knorm", "quantized:bits=2"], [0.25, 0.5])  # doctest: +NORMALIZE_WHITESPACE
[Method(spec='full', name='full', kwargs={}, ratio=None),
 Method(spec='knorm', name='knorm', kwargs={}, ratio=0.25),
 Method(spec='knorm', name='knorm', kwargs={}, ratio=0.5),
 Method(spec='quantized:bits=2', name='quantized', kwargs={'bits': 2}, ratio=None)]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# our policy name -> kvpress press name (the presses whose parameters mean the same)
KVPRESS_NAMES = {
    "knorm": "knorm",
    "streaming_llm": "streaming_llm",
    "snapkv": "snapkv",
    "tova": "tova",
    "observed_attention": "observed_attention",
    "keydiff": "keydiff",
    "lagkv": "lagkv",
    "pyramidkv": "pyramidkv",
    "adakv": "adakv:snapkv",
    "chunkkv": "chunkkv:snapkv",
    "expected_attention": "expected_attention",
    "random": "random",
}

NOT_EVICTING = ("full", "quantized", "quanto")


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"snapkv:head_budget=adakv,window_size=32"`` → ("snapkv", {...}): a policy (or named
    cache) and keyword arguments of its cache; values parse as int, float, bool or str."""
    name, _, rest = spec.partition(":")
    kwargs: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"method spec {spec!r}: expected name:key=value,key=value, got {item!r}")
        value: Any = raw
        for cast in (int, float):
            try:
                value = cast(raw)
                break
            except ValueError:
                pass
        if raw in ("true", "false", "True", "False"):
            value = raw.lower() == "true"
        kwargs[key] = value
    return name, kwargs


@dataclass(frozen=True)
class Method:
    """One cache configuration of a run: a spec at one compression ratio (None when the
    cache does not evict)."""

    spec: str
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict, hash=False, compare=True)
    ratio: float | None = None

    @property
    def label(self) -> str:
        return self.spec if self.ratio is None else f"{self.spec}@{self.ratio:g}"

    @property
    def bits(self) -> float | None:
        """Bits per stored element: 16 for full precision, the quantizer's otherwise."""
        if self.name == "quantized":
            return float(self.kwargs.get("bits", 4))
        if self.name == "quanto":
            return float(self.kwargs.get("nbits", 4))
        return 16.0

    @property
    def kvpress_twin(self) -> dict[str, Any] | None:
        """The kvpress press request that runs the same method, or None (a spec with
        keyword arguments has no twin: the parameters are not named alike)."""
        if self.name in KVPRESS_NAMES and not self.kwargs and self.ratio is not None:
            return {"name": KVPRESS_NAMES[self.name], "compression_ratio": self.ratio, "ours": self.label}
        return None


def check_spec(spec: str) -> None:
    from kvpress_rs.errors import InvalidArgumentError
    from kvpress_rs.policies import CACHES

    name, _ = parse_spec(spec)
    if name not in CACHES and name not in NOT_EVICTING:
        known = ", ".join([*NOT_EVICTING, *CACHES])
        raise InvalidArgumentError(f"`methods`: unknown method {name!r} in {spec!r}; expected one of {known}")


def expand(specs: list[str], ratios: list[float]) -> list[Method]:
    """Each eviction spec at each ratio; the others once."""
    out = []
    for spec in specs:
        check_spec(spec)
        name, kwargs = parse_spec(spec)
        if name in NOT_EVICTING:
            out.append(Method(spec, name, kwargs, None))
        else:
            out.extend(Method(spec, name, kwargs, r) for r in ratios)
    return out


def quanto_available() -> bool:
    try:
        import optimum.quanto  # noqa: F401
    except Exception:
        return False
    return True


def make_cache(model: Any, method: Method) -> Any:
    """A fresh cache object for ``method``."""
    import kvpress_rs
    from kvpress_rs.policies import CACHES
    from transformers import DynamicCache

    if method.name == "full":
        return DynamicCache(config=model.config)
    if method.name == "quantized":
        return kvpress_rs.QuantizedKVCache(model, **method.kwargs)
    if method.name == "quanto":
        if not quanto_available():
            raise ModuleNotFoundError("`quanto` methods need optimum-quanto: pip install optimum-quanto==0.2.7 (make bench-deps)")
        from transformers import QuantizedCache

        return QuantizedCache("quanto", model.config, **{"nbits": 4, **method.kwargs})
    return CACHES[method.name](model, compression_ratio=method.ratio, **method.kwargs)


def our_cache(model: Any, spec: str, ratio: float) -> Any:
    """An eviction cache from a spec at ``ratio`` (a policy of the registry, or any scorer
    name ``KVCache`` takes)."""
    import kvpress_rs
    from kvpress_rs.policies import CACHES

    name, kwargs = parse_spec(spec)
    if name in CACHES:
        return CACHES[name](model, compression_ratio=ratio, **kwargs)
    return kvpress_rs.KVCache(model, name, compression_ratio=ratio, **kwargs)


def _flat_tensors(t: Any) -> list[Any]:
    """The plain tensors inside a (possibly nested) tensor subclass such as quanto's."""
    import torch

    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return [x for n in names for x in _flat_tensors(getattr(t, n))]
    return [t] if isinstance(t, torch.Tensor) else []


def kv_bytes(cache: Any) -> int:
    """Bytes of keys/values a cache holds (ours: exact ``nbytes``; others: their tensors)."""
    if hasattr(cache, "nbytes"):
        return int(cache.nbytes)
    total = 0
    for layer in cache.layers:
        for attr in ("_quantized_keys", "_quantized_values", "keys", "values"):
            t = getattr(layer, attr, None)
            if t is not None:
                total += sum(x.nbytes for x in _flat_tensors(t))
    return total
