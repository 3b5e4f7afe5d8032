"""Performance profiles: measured throughput curves, and the timing model built on them.

A profile gives T(c), aggregate output tokens/s at c concurrent closed-loop clients, for a
fixed workload (input tokens I, output tokens O), and a prefill rate P.

Interpolation: T is linear in c between measured points (piecewise-linear interpolation is
monotone between points: it never overshoots the measurements). Below the first point it
is T(c1); past the last point the aggregate stays at T(cmax): a larger batch is assumed to
add no throughput, so each stream slows as 1/b.

The measured T is end to end, prefill included. In a closed loop every request costs
O/T_dec(b) seconds of batch decode time and I/P seconds of prefill that holds the batch,
so T = 1 / (1/T_dec + I/(O*P)) and the decode-only rate used for steps is

    T_dec(b) = 1 / (1/T(b) - I/(O*P)).

With b sequences decoding, one step emits one token for each and lasts b / T_dec(b)
seconds; a step that also prefills N prompt tokens lasts N / P seconds longer.
"""

from __future__ import annotations

import bisect
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any


class ProfileError(Exception):
    pass


@dataclass(frozen=True)
class Profile:
    name: str
    engine: str  # "llamacpp" | "vllm"
    description: str
    concurrency: tuple[int, ...]
    output_tok_s: tuple[float, ...]
    prefill_tok_s: float
    input_tokens: int
    output_tokens: int
    default_slots: int | None = None

    def __post_init__(self) -> None:
        if len(self.concurrency) != len(self.output_tok_s) or not self.concurrency:
            raise ProfileError(f"{self.name}: concurrency and output_tok_s differ in length")
        if list(self.concurrency) != sorted(set(self.concurrency)):
            raise ProfileError(f"{self.name}: concurrency must be strictly increasing")
        floor = self.input_tokens / (self.output_tokens * self.prefill_tok_s)
        if any(1 / t <= floor for t in self.output_tok_s):
            raise ProfileError(f"{self.name}: prefill_tok_s too low for the measured rates")

    def aggregate_tok_s(self, batch: float) -> float:
        """T(b): end-to-end aggregate output tokens/s at b concurrent streams."""
        cs, ts = self.concurrency, self.output_tok_s
        if batch <= cs[0]:
            return ts[0]
        if batch >= cs[-1]:
            return ts[-1]
        i = bisect.bisect_right(cs, batch)
        c0, c1, t0, t1 = cs[i - 1], cs[i], ts[i - 1], ts[i]
        return t0 + (t1 - t0) * (batch - c0) / (c1 - c0)

    def decode_tok_s(self, batch: int) -> float:
        """T_dec(b): aggregate decode tokens/s with prefill taken out."""
        prefill_share = self.input_tokens / (self.output_tokens * self.prefill_tok_s)
        return 1.0 / (1.0 / self.aggregate_tok_s(batch) - prefill_share)

    def step_seconds(self, decoding: int, prefill_tokens: int) -> float:
        """Length of one engine step at speed 1."""
        decode = decoding / self.decode_tok_s(decoding) if decoding else 0.0
        return decode + prefill_tokens / self.prefill_tok_s


def _files() -> list[Path]:
    folder = resources.files("emulator") / "profiles"
    return sorted(Path(str(p)) for p in folder.iterdir() if p.name.endswith(".toml"))


def _parse(data: dict[str, Any], source: str) -> dict[str, Profile]:
    workload = data.get("workload", {})
    found = {}
    for name, entry in data.get("engines", {}).items():
        if "prefill_tok_s" not in entry:
            continue  # not enough to emulate
        try:
            found[name] = Profile(
                name=name,
                engine=entry["engine"],
                description=entry.get("description", ""),
                concurrency=tuple(entry.get("concurrency", workload.get("concurrency", ()))),
                output_tok_s=tuple(float(x) for x in entry["output_tok_s"]),
                prefill_tok_s=float(entry["prefill_tok_s"]),
                input_tokens=int(workload.get("input_tokens", 512)),
                output_tokens=int(workload.get("output_tokens", 128)),
                default_slots=entry.get("default_slots"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProfileError(f"{source}: engine {name}: {exc}") from exc
    return found


def load_profiles(extra: Path | None = None) -> dict[str, Profile]:
    """Every profile shipped with the package, plus those of an extra file."""
    profiles: dict[str, Profile] = {}
    for path in [*_files(), *([extra] if extra else [])]:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ProfileError(f"cannot read profile file {path}: {exc}") from exc
        profiles.update(_parse(data, str(path)))
    return profiles


def get_profile(name: str, extra: Path | None = None) -> Profile:
    profiles = load_profiles(extra)
    if name not in profiles:
        raise ProfileError(f"unknown profile {name!r}; known: {', '.join(sorted(profiles))}")
    return profiles[name]
